//! `checkpoint` and `restore`: a container's whole micro-VM written to a directory by its
//! monitor (the image's format is `checkpoint_image`) and brought back in a new monitor.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use super::{finish_monitor, Container, CreateOptions, VmSource};
use crate::checkpoint_image::ImageManifest;
use crate::container::state::Status;
use crate::logging::Logger;
use crate::monitor::control::Request;

/// What `checkpoint` needs.
#[derive(Debug, Clone)]
pub struct CheckpointOptions {
    /// Directory the image is written to.
    pub image_path: PathBuf,
    /// Keep the container running after the checkpoint (else it is stopped, as runc's is).
    pub leave_running: bool,
}

/// What `restore` needs: `create`'s options and the image.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Directory of the image.
    pub image_path: PathBuf,
    pub create: CreateOptions,
}

impl Container {
    /// The monitor writes the image; unless told to leave the container running, the
    /// container is stopped afterwards and this returns once its monitor is gone.
    pub fn checkpoint(&self, opts: &CheckpointOptions) -> Result<()> {
        let st = &self.state;
        if !matches!(st.status, Status::Running | Status::Paused) {
            bail!("container {} is not running", st.id);
        }
        let dir = std::path::absolute(&opts.image_path)?;
        let req = Request::Checkpoint {
            dir,
            leave_running: opts.leave_running,
        };
        self.call(&req)?;
        if !opts.leave_running {
            finish_monitor(st);
        }
        Ok(())
    }

    /// Checks the image, claims the id and starts a monitor that brings the VM back; returns
    /// once the container runs. Warnings go to `logger`.
    pub fn restore(root: &Path, opts: &RestoreOptions, logger: &Logger) -> Result<Container> {
        let dir = std::path::absolute(&opts.image_path)?;
        ImageManifest::read_checked(&dir)?;
        let source = |_: &_| Ok(VmSource::Checkpoint(dir.clone()));
        Container::create_from(root, &opts.create, logger, source)
    }
}
