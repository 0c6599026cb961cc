//! The control protocol of the appliance and the splitter, defined once: every request and
//! every answer as a serde type, so the processes that answer and the `cdp` command that asks
//! share one definition and a renamed field is a compile error, not a silent 0.
//!
//! The wire is JSON lines over a unix socket: one request per line, tagged by `command`
//! (`{"command": "status"}`), one answer per line. A failed request is answered with
//! `ErrorAnswer` (`{"error": MESSAGE, "code": CODE}`) and ends its connection.
//!
//! Which answer each request gets:
//!
//! | request | answer |
//! |---|---|
//! | `Request::Status` | `ApplianceStatus` |
//! | `Request::BookmarkCreate` | `BookmarkCreated` |
//! | `Request::BookmarkList` | `BookmarkListed` |
//! | `Request::PointResolve` | `PointResolved` |
//! | `Request::Timeline` | `Timeline` |
//! | `Request::JournalConsolidate` | `JournalConsolidated` |
//! | `Request::ImageAccess` | `ImageAccessed` |
//! | `Request::ImageList` | `ImageListed` |
//! | `Request::ImageRelease` | `ImageReleased` |
//! | `Request::GroupCreate` | `GroupCreated` |
//! | `Request::GroupList` | `GroupListed` |
//! | `Request::VolumeAdd` | `VolumeAdded` |
//! | `Request::VolumeRemove` | `VolumeRemoved` |
//! | `Request::Failover` | `FailedOver` |
//! | `Request::Reprotect` | `Reprotected` |
//! | `SplitterRequest::Status` | `SplitterStatus` |
//! | `SplitterRequest::Resync` | `SplitterResyncing` |
//! | `SplitterRequest::VolumeAdd` | `SplitterVolumeAdded` |
//! | `SplitterRequest::VolumeRemove` | `SplitterVolumeRemoved` |

mod answer;
mod error;
pub mod limits;
mod names;
mod request;
mod role;
mod splitter;
mod status;

pub use answer::*;
pub use error::{ErrorAnswer, ErrorCode};
pub use names::{validate_bookmark_name, validate_new_bookmark_name, BadBookmarkName};
pub use request::{Consistency, GroupCreate, Request, SplitterRequest};
pub use role::*;
pub use splitter::*;
pub use status::*;

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: the typed requests put on the wire exactly what the processes have always
    /// read. Method: golden JSON per request form the `cdp` command sends.
    #[test]
    fn requests_keep_their_wire_form() {
        let json = |r: &Request| serde_json::to_string(r).expect("encodes");
        assert_eq!(json(&Request::Status), r#"{"command":"status"}"#);
        assert_eq!(
            json(&Request::GroupCreate(GroupCreate {
                name: "g".into(),
                ..GroupCreate::default()
            })),
            r#"{"command":"group_create","name":"g"}"#
        );
        assert_eq!(
            json(&Request::ImageRelease { id: "3".into() }),
            r#"{"command":"image_release","id":"3"}"#
        );
        assert_eq!(
            serde_json::to_string(&SplitterRequest::Resync {
                volume: "vol0".into(),
                verify: true
            })
            .expect("encodes"),
            r#"{"command":"resync","volume":"vol0","verify":true}"#
        );
        // What older clients sent, with defaults left out, still parses.
        let parsed: Request = serde_json::from_str(
            r#"{"command":"bookmark_create","name":"b","consistency":"crash"}"#,
        )
        .expect("parses");
        assert!(matches!(
            parsed,
            Request::BookmarkCreate {
                keep: false,
                freeze_window_ms: 0,
                group: None,
                ..
            }
        ));
    }

    /// Goal: error answers keep their bytes and their codes. Method: golden JSON, and an
    /// answer without a code (an older process) reads as a plain failure.
    #[test]
    fn error_answers_keep_their_bytes_and_codes() {
        let answer = ErrorAnswer {
            code: ErrorCode::NotFound,
            error: "no group named \"x\"".into(),
        };
        assert_eq!(
            serde_json::to_string(&answer).expect("encodes"),
            r#"{"code":"not_found","error":"no group named \"x\""}"#
        );
        let old: ErrorAnswer = serde_json::from_str(r#"{"error":"boom"}"#).expect("parses");
        assert_eq!(old.code, ErrorCode::Failed);
        // A successful answer is never mistaken for an error.
        assert!(serde_json::from_str::<ErrorAnswer>(r#"{"images":[]}"#).is_err());
    }

    /// Goal: a renamed or missing field is an error, never a silent 0 (issue 13, item 5).
    /// Method: decode an answer whose field is misnamed.
    #[test]
    fn a_misnamed_field_is_an_error_not_a_default() {
        let good = r#"{"group":"g","bookmarks":[{"name":"b","seq":7,"timestamp_ns":1,
            "time":"1970-01-01T00:00:00.000Z","consistency":"crash","freeze_window_ms":0,
            "keep":false,"consolidated":false}]}"#;
        let listed: BookmarkListed = serde_json::from_str(good).expect("parses");
        assert_eq!(listed.bookmarks[0].seq, 7);
        let renamed = good.replace("\"seq\"", "\"sequence\"");
        let err = serde_json::from_str::<BookmarkListed>(&renamed).expect_err("refused");
        assert!(err.to_string().contains("missing field `seq`"), "{err}");
    }

    /// Goal: the setting types read as the config and status always wrote them.
    #[test]
    fn compress_level_is_a_number_or_adaptive() {
        let level: CompressLevel = serde_json::from_str("3").expect("parses");
        assert_eq!(level, CompressLevel::Fixed(3));
        let level: CompressLevel = serde_json::from_str("\"adaptive\"").expect("parses");
        assert_eq!(level, CompressLevel::Adaptive);
        assert!(serde_json::from_str::<CompressLevel>("\"fast\"").is_err());
        assert_eq!(
            serde_json::to_string(&ImageState::RollingBack).expect("encodes"),
            "\"rolling_back\""
        );
        assert_eq!(
            serde_json::to_string(&GroupOrigin::ApplianceToml).expect("encodes"),
            "\"appliance.toml\""
        );
    }
}
