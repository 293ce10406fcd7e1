//! `husk template build|list|rm`: the templates every container's micro-VM is cloned from.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use husk_templates::{Store, DEFAULT_NAME};

use crate::template::{self, DEFAULT_MEMORY_MIB, DEFAULT_VCPUS};

#[derive(Subcommand, Debug)]
pub enum TemplateCmd {
    /// Build (or rebuild) a template: boot a guest, wait for its agent, snapshot it.
    Build(BuildArgs),
    /// List templates: name, size, kernel, age, running clones.
    List,
    /// Remove a template (refused while clones of it run, unless --force).
    Rm {
        name: String,
        /// Remove it even though clones run (they keep their mapped memory).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// Template name.
    #[arg(default_value = DEFAULT_NAME)]
    pub name: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = DEFAULT_VCPUS)]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = DEFAULT_MEMORY_MIB)]
    pub memory: u32,
    /// Guest kernel (vmlinux); default: the built one.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
}

/// `husk template …`.
pub fn run(cmd: TemplateCmd) -> Result<()> {
    let store = Store::from_env();
    match cmd {
        TemplateCmd::Build(args) => {
            let settings = template::settings(args.vcpus, args.memory, args.kernel)?;
            let t = store.build(&args.name, &settings, &|t| template::build_guest(t, true))?;
            println!("{}", t.dir.display());
            Ok(())
        }
        TemplateCmd::List => list(&store),
        TemplateCmd::Rm { name, force } => store.remove(&name, force),
    }
}

fn list(store: &Store) -> Result<()> {
    println!(
        "{:<16} {:>10} {:>8} {:>7}  KERNEL",
        "NAME", "SIZE", "AGE", "CLONES"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for t in store.list()? {
        println!(
            "{:<16} {:>9}M {:>8} {:>7}  {}",
            t.name,
            t.size.div_ceil(1 << 20),
            age(now.saturating_sub(t.created)),
            t.clones,
            t.kernel.display()
        );
    }
    Ok(())
}

fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}
