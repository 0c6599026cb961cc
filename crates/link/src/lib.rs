//! The split link: messages from splitter to appliance and back, their frame format and async codec.

pub mod checksum;
pub mod codec;
pub mod control_socket;
pub mod dedup_window;
pub mod dirty_bitmap;
pub mod error;
pub mod frame;
pub mod limits;
pub mod message;
pub mod replication;
pub mod socket_access;
pub mod watermark;

pub use codec::{connect, FrameReader, FrameWriter, LinkStream};
pub use error::LinkError;
pub use message::Message;
