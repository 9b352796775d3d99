//! Whether to add a new device or recover one the kernel kept (pure).

use libublk::sys;

use super::UblkError;

/// What the kernel reports about an existing device id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Existing {
    /// `UBLK_S_DEV_*`.
    pub state: u16,
    /// The server process the kernel recorded.
    pub pid: i32,
    /// Whether that process still exists.
    pub pid_alive: bool,
}

/// The next step for a device id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Add a new device (`None`: the driver picks the id).
    Add(Option<u32>),
    /// Take over the quiesced device: `START_USER_RECOVERY`, serve, `END_USER_RECOVERY`.
    Recover(u32),
    /// The old server is gone but the driver has not quiesced the device yet (it notices
    /// a dead server within seconds): ask again.
    Wait,
}

/// Decides from the requested id and what the kernel has under it.
pub fn plan(requested: Option<u32>, existing: Option<Existing>) -> Result<Plan, UblkError> {
    let Some(id) = requested else {
        return Ok(Plan::Add(None));
    };
    let Some(e) = existing else {
        return Ok(Plan::Add(Some(id)));
    };
    match u32::from(e.state) {
        sys::UBLK_S_DEV_QUIESCED | sys::UBLK_S_DEV_FAIL_IO => Ok(Plan::Recover(id)),
        sys::UBLK_S_DEV_LIVE if e.pid_alive && e.pid != std::process::id() as i32 => {
            Err(UblkError::InUse { id, pid: e.pid })
        }
        _ => Ok(Plan::Wait),
    }
}

/// A device state for messages.
pub fn state_name(state: u16) -> String {
    match u32::from(state) {
        sys::UBLK_S_DEV_DEAD => "dead".into(),
        sys::UBLK_S_DEV_LIVE => "live".into(),
        sys::UBLK_S_DEV_QUIESCED => "quiesced".into(),
        sys::UBLK_S_DEV_FAIL_IO => "fail-io".into(),
        other => format!("unknown ({other})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn existing(state: u32, pid_alive: bool) -> Option<Existing> {
        Some(Existing {
            state: state as u16,
            pid: 1,
            pid_alive,
        })
    }

    #[test]
    fn no_id_or_unknown_id_adds_a_device() {
        assert_eq!(plan(None, None).unwrap(), Plan::Add(None));
        assert_eq!(
            plan(None, existing(sys::UBLK_S_DEV_QUIESCED, false)).unwrap(),
            Plan::Add(None)
        );
        assert_eq!(plan(Some(3), None).unwrap(), Plan::Add(Some(3)));
    }

    #[test]
    fn a_quiesced_device_is_recovered() {
        assert_eq!(
            plan(Some(0), existing(sys::UBLK_S_DEV_QUIESCED, false)).unwrap(),
            Plan::Recover(0)
        );
        assert_eq!(
            plan(Some(0), existing(sys::UBLK_S_DEV_FAIL_IO, false)).unwrap(),
            Plan::Recover(0)
        );
    }

    #[test]
    fn a_live_device_of_a_live_server_is_refused() {
        let e = plan(Some(2), existing(sys::UBLK_S_DEV_LIVE, true)).unwrap_err();
        assert!(matches!(e, UblkError::InUse { id: 2, pid: 1 }), "{e}");
    }

    #[test]
    fn a_live_device_of_a_dead_server_is_waited_for() {
        assert_eq!(
            plan(Some(2), existing(sys::UBLK_S_DEV_LIVE, false)).unwrap(),
            Plan::Wait
        );
        assert_eq!(
            plan(Some(2), existing(sys::UBLK_S_DEV_DEAD, false)).unwrap(),
            Plan::Wait
        );
        assert_eq!(state_name(sys::UBLK_S_DEV_LIVE as u16), "live");
    }
}
