//! The transport's part of a snapshot: registers, queue layout and ring positions, and the
//! device's own state nested inside.
//!
//! Ring positions come from guest memory: every device completes each descriptor chain it
//! pops before it waits again, so while its worker is held (`quiesce`) the device has
//! consumed exactly the chains it has returned, and next_avail = next_used = the used ring's
//! idx. (None of our devices offers VIRTIO_F_EVENT_IDX, which would add nothing here anyway.)

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use super::{MmioTransport, QueueConfig};
use crate::persist::{decode_state, encode_state, Persist};

/// Offset of `idx` in a split virtqueue's used ring.
const USED_IDX_OFFSET: u64 = 2;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct TransportState {
    device_type: u32,
    status: u32,
    driver_features: u64,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    config_generation: u32,
    interrupt_status: u32,
    activated: bool,
    queues: Vec<QueueConfig>,
    device: Vec<u8>,
}

impl MmioTransport {
    /// The queue as the driver set it up, with the ring positions filled in.
    fn save_queue(&self, q: &QueueConfig) -> Result<QueueConfig, String> {
        let position = if self.activated && q.ready {
            self.mem
                .read_obj::<u16>(GuestAddress(q.used + USED_IDX_OFFSET))
                .map_err(|e| format!("reading the used ring at {:#x}: {e}", q.used))?
        } else {
            0
        };
        Ok(QueueConfig {
            next_avail: position,
            next_used: position,
            ..*q
        })
    }

    fn restore_queues(&mut self, saved: &[QueueConfig]) -> Result<(), String> {
        let max_sizes = |qs: &[QueueConfig]| qs.iter().map(|q| q.max_size).collect::<Vec<_>>();
        if max_sizes(saved) != max_sizes(&self.queues) {
            return Err(format!(
                "saved queue sizes {:?}, the device has {:?}",
                max_sizes(saved),
                max_sizes(&self.queues)
            ));
        }
        self.queues.copy_from_slice(saved);
        Ok(())
    }
}

impl Persist for MmioTransport {
    fn quiesce(&mut self) -> Result<(), String> {
        self.device.quiesce()
    }

    fn release(&mut self) {
        self.device.release();
    }

    fn save_state(&mut self) -> Result<Vec<u8>, String> {
        let queues = self
            .queues
            .iter()
            .map(|q| self.save_queue(q))
            .collect::<Result<_, _>>()?;
        encode_state(&TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            activated: self.activated,
            queues,
            device: self.device.save_state()?,
        })
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), String> {
        let s: TransportState = decode_state(state)?;
        if s.device_type != self.device.device_type() {
            return Err(format!(
                "saved device type {}, restored device type {}",
                s.device_type,
                self.device.device_type()
            ));
        }
        self.restore_queues(&s.queues)?;
        self.device.restore_state(&s.device)?;
        self.status = s.status;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.config_generation = s.config_generation;
        self.interrupt.set_status(s.interrupt_status);
        if s.activated {
            self.device.ack_features(s.driver_features);
            self.activate();
            if !self.activated {
                return Err("the device did not start again".into());
            }
        }
        Ok(())
    }
}
