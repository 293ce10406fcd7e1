//! Device state in snapshots: the [`Persist`] trait every saved device implements, the
//! encoding of its state, and the operations on a VM's whole device list (hold, release, save,
//! restore). Devices import this module, not the snapshot machinery.

use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::VmError;

/// A device whose state goes into snapshots.
///
/// The snapshot core stores the bytes `save_state` returns under the device's id (its bus and
/// address) without looking inside, and hands them back to `restore_state` on the device that
/// a restore builds at the same place. Devices encode their state with [`encode_state`].
pub trait Persist: Send {
    /// Stops background work that could change the device or guest memory, until `release`.
    fn quiesce(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// Lets background work go on after `quiesce`.
    fn release(&mut self) {}
    /// The device's state.
    fn save_state(&mut self) -> Result<Vec<u8>, String>;
    /// Takes the state `save_state` returned, on a device built from the same configuration
    /// (possibly with overrides) that the guest has not touched yet.
    fn restore_state(&mut self, state: &[u8]) -> Result<(), String>;
}

/// A device in a VM's snapshot list: its id and the device.
pub type PersistDevice = (String, Arc<Mutex<dyn Persist>>);

/// One device's saved state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// Bus and address, e.g. `pio@0x3f8`, `mmio@0xd0000000`.
    pub id: String,
    /// What the device's `save_state` returned.
    pub state: Vec<u8>,
}

/// Encodes a device's state the way the snapshot body is encoded.
pub fn encode_state<T: Serialize>(state: &T) -> Result<Vec<u8>, String> {
    postcard::to_stdvec(state).map_err(|e| format!("encoding state: {e}"))
}

/// Decodes what [`encode_state`] produced.
pub fn decode_state<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    postcard::from_bytes(bytes).map_err(|e| format!("decoding state: {e}"))
}

fn lock(dev: &PersistDevice) -> std::sync::MutexGuard<'_, dyn Persist + 'static> {
    dev.1.lock().unwrap_or_else(|p| p.into_inner())
}

fn device_err(id: &str) -> impl FnOnce(String) -> VmError + '_ {
    move |reason| VmError::SnapshotDevice {
        id: id.to_string(),
        reason,
    }
}

/// Holds every device's background work; on failure releases those already held.
pub fn quiesce_all(devices: &[PersistDevice]) -> Result<(), VmError> {
    for (i, dev) in devices.iter().enumerate() {
        if let Err(e) = lock(dev).quiesce() {
            release_all(&devices[..i]);
            return Err(device_err(&dev.0)(e));
        }
    }
    Ok(())
}

/// Lets every device's background work go on.
pub fn release_all(devices: &[PersistDevice]) {
    for dev in devices {
        lock(dev).release();
    }
}

/// Saves every device, in list order.
pub fn save_all(devices: &[PersistDevice]) -> Result<Vec<DeviceState>, VmError> {
    devices
        .iter()
        .map(|dev| {
            let state = lock(dev).save_state().map_err(device_err(&dev.0))?;
            Ok(DeviceState {
                id: dev.0.clone(),
                state,
            })
        })
        .collect()
}

/// Restores each saved state into the device with the same id; the new VM must have exactly
/// the saved devices.
pub fn restore_all(devices: &[PersistDevice], saved: &[DeviceState]) -> Result<(), VmError> {
    let ids = |v: Vec<&str>| v.join(", ");
    let have: Vec<&str> = devices.iter().map(|d| d.0.as_str()).collect();
    let want: Vec<&str> = saved.iter().map(|d| d.id.as_str()).collect();
    if have != want {
        return Err(VmError::SnapshotState(format!(
            "the restored VM has devices [{}], the snapshot [{}]",
            ids(have),
            ids(want)
        )));
    }
    for (dev, state) in devices.iter().zip(saved) {
        lock(dev)
            .restore_state(&state.state)
            .map_err(device_err(&dev.0))?;
    }
    Ok(())
}
