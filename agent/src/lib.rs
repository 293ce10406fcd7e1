//! Host<->guest protocol and the guest agent.
