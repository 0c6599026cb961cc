//! What is recoverable: the one place that decides which seqs of a group may be offered as
//! points. `cdp status`, `point resolve`, `image access`, `restore`, `timeline` and the
//! consolidation report all ask here, so no two commands disagree about the window.

use cdp_link::control_socket::ControlError;
use cdp_types::Seq;

use super::Group;

impl Group {
    /// Refuses `at` unless an image at it can be shown exactly: inside the window (retention
    /// and the undo floor below, the last record above), and kept by consolidation.
    pub fn check_recoverable(&self, at: Seq) -> Result<(), ControlError> {
        let oldest = self.oldest_point();
        if at < oldest {
            return Err(ControlError::not_found(format!(
                "seq {at} is older than the oldest recoverable point (seq {oldest})"
            )));
        }
        let last = self.journal.last_seq();
        if at > last {
            return Err(ControlError::not_found(format!(
                "seq {at} is past the journal's last record (seq {last})"
            )));
        }
        self.check_not_consolidated(at)
            .map_err(|e| ControlError::refused(e.to_string()))
    }

    /// How many points consolidation kept that are still inside the window (kept points below
    /// it were released by retention and open nowhere).
    pub fn kept_points_recoverable(&self) -> usize {
        let oldest = self.oldest_point().0;
        let state = self.consolidation_state.read();
        state.kept.range(oldest..).count()
    }
}
