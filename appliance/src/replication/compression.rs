//! Chooses the zstd level of each replication batch: the configured level, or adaptively from what holds the link back.
//!
//! Adaptive (`compress_level = "adaptive"`). What a batch costs the shipper thread is
//! compression time plus time waiting for the link, and what compression buys is fewer wire
//! bytes. So, judged over a few batches sent with records waiting behind them (a backlog:
//! without one the level cannot change throughput):
//! - waiting for the *wire* (the bandwidth limit's bucket, or a socket write blocked on a
//!   full send buffer) more than twice as long as compressing: the wire is the bottleneck and
//!   each byte saved is time saved; one level up.
//! - compressing more than twice as long as all the waiting (wire plus acknowledgements):
//!   the CPU is the bottleneck; one level down.
//! - otherwise hold. Waiting for acknowledgements (the remote's journal and fsync, round
//!   trips) is not a reason to compress harder: fewer wire bytes do not shorten it.
//!
//! Without a backlog the level returns one step per decision towards `ADAPTIVE_LEVEL_START`,
//! so a burst that drove it up does not keep burning CPU afterwards. A batch that compression
//! shrank by less than `INCOMPRESSIBLE_SAVING` (random or encrypted data) sends the next
//! `INCOMPRESSIBLE_SKIP_BATCHES` uncompressed, then compression is tried again.

use std::time::Duration;

use cdp_link::replication::BatchCodec;

use crate::config::CompressLevel;

/// Where adaptive starts, and where it returns when the link is idle: zstd's own default.
pub const ADAPTIVE_LEVEL_START: i32 = 3;
/// Adaptive never goes above this: higher levels compress at a few MB/s and need tens of MB.
pub const ADAPTIVE_LEVEL_MAX: i32 = 15;
/// Adaptive never goes below zstd's fastest positive level.
pub const ADAPTIVE_LEVEL_MIN: i32 = 1;
/// Batches judged together, so one odd batch does not move the level.
const DECISION_BATCHES: u32 = 4;
/// A compressed batch saving less than this fraction of its bytes counts as incompressible.
const INCOMPRESSIBLE_SAVING: f64 = 0.02;
/// Batches sent uncompressed after an incompressible one, before trying again.
const INCOMPRESSIBLE_SKIP_BATCHES: u32 = 8;
/// Smaller batches say little about the data (a few record heads): never judged incompressible.
const INCOMPRESSIBLE_JUDGED_BYTES_MIN: usize = 64 * 1024;

/// What one batch cost and gave, as the shipper measured it.
#[derive(Clone, Copy, Debug, Default)]
pub struct BatchCost {
    /// Time in zstd (0 for a batch sent uncompressed by choice).
    pub compress: Duration,
    /// Waiting for the wire: the bandwidth limit's bucket and the socket write.
    pub wire_wait: Duration,
    /// Waiting for the remote to acknowledge earlier batches (window of batches in flight full).
    pub ack_wait: Duration,
    /// More records were ready when the batch was cut.
    pub backlog: bool,
    /// Bytes before compression, and on the wire (equal if it went uncompressed).
    pub stream_len: usize,
    pub sent_len: usize,
    /// Compression was tried on this batch.
    pub tried: bool,
}

/// The level for each batch of one shipper.
pub struct LevelChooser {
    setting: CompressLevel,
    level: i32,
    skip_left: u32,
    window: BatchCost,
    window_batches: u32,
    window_backlogged: u32,
}

impl LevelChooser {
    pub fn new(setting: CompressLevel) -> LevelChooser {
        LevelChooser {
            setting,
            level: match setting {
                CompressLevel::Fixed(level) => level,
                CompressLevel::Adaptive => ADAPTIVE_LEVEL_START,
            },
            skip_left: 0,
            window: BatchCost::default(),
            window_batches: 0,
            window_backlogged: 0,
        }
    }

    /// How to compress the next batch.
    pub fn codec(&self) -> BatchCodec {
        if self.level <= 0 || self.skip_left > 0 {
            BatchCodec::Raw
        } else {
            BatchCodec::Zstd(self.level)
        }
    }

    /// Learns from a batch just sent (the fixed setting ignores it).
    pub fn observe(&mut self, cost: BatchCost) {
        if self.setting != CompressLevel::Adaptive {
            return;
        }
        if cost.tried && cost.stream_len >= INCOMPRESSIBLE_JUDGED_BYTES_MIN {
            let saved = cost.stream_len.saturating_sub(cost.sent_len) as f64;
            if saved < cost.stream_len as f64 * INCOMPRESSIBLE_SAVING {
                self.skip_left = INCOMPRESSIBLE_SKIP_BATCHES;
            }
        } else if !cost.tried {
            self.skip_left = self.skip_left.saturating_sub(1);
        }
        self.window.compress += cost.compress;
        self.window.wire_wait += cost.wire_wait;
        self.window.ack_wait += cost.ack_wait;
        self.window_batches += 1;
        self.window_backlogged += u32::from(cost.backlog);
        if self.window_batches < DECISION_BATCHES {
            return;
        }
        let w = std::mem::take(&mut self.window);
        let backlogged = self.window_backlogged == self.window_batches;
        self.window_batches = 0;
        self.window_backlogged = 0;
        let step = if !backlogged {
            (ADAPTIVE_LEVEL_START - self.level).signum()
        } else if w.compress.is_zero() {
            // Nothing was compressed (incompressible data): nothing to judge the level by.
            0
        } else if w.wire_wait > w.compress * 2 {
            1
        } else if w.compress > (w.wire_wait + w.ack_wait) * 2 {
            -1
        } else {
            0
        };
        self.level = (self.level + step).clamp(ADAPTIVE_LEVEL_MIN, ADAPTIVE_LEVEL_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn batch(compress: u64, wire_wait: u64, ack_wait: u64, backlog: bool) -> BatchCost {
        BatchCost {
            compress: ms(compress),
            wire_wait: ms(wire_wait),
            ack_wait: ms(ack_wait),
            backlog,
            stream_len: 100_000,
            sent_len: 30_000,
            tried: true,
        }
    }

    fn level(c: &LevelChooser) -> i32 {
        match c.codec() {
            BatchCodec::Raw => 0,
            BatchCodec::Zstd(l) => l,
        }
    }

    #[test]
    fn a_slow_wire_raises_the_level_and_a_busy_cpu_lowers_it() {
        let mut c = LevelChooser::new(CompressLevel::Adaptive);
        assert_eq!(level(&c), ADAPTIVE_LEVEL_START);
        // The bandwidth limit holds batches back: compress harder, up to the cap.
        for _ in 0..200 {
            c.observe(batch(10, 100, 0, true));
        }
        assert_eq!(level(&c), ADAPTIVE_LEVEL_MAX);
        // Compression is most of the time: lighter.
        for _ in 0..8 {
            c.observe(batch(100, 5, 5, true));
        }
        assert_eq!(level(&c), ADAPTIVE_LEVEL_MAX - 2);
        // Waiting for acks only (the remote's disk) holds the level.
        for _ in 0..8 {
            c.observe(batch(10, 0, 100, true));
        }
        assert_eq!(level(&c), ADAPTIVE_LEVEL_MAX - 2);
        // No backlog: back towards the start level.
        for _ in 0..200 {
            c.observe(batch(10, 100, 0, false));
        }
        assert_eq!(level(&c), ADAPTIVE_LEVEL_START);
        for _ in 0..200 {
            c.observe(batch(100, 0, 0, true));
        }
        assert_eq!(level(&c), ADAPTIVE_LEVEL_MIN);
    }

    #[test]
    fn incompressible_batches_skip_compression_for_a_while() {
        let mut c = LevelChooser::new(CompressLevel::Adaptive);
        c.observe(BatchCost {
            stream_len: 100_000,
            sent_len: 100_000,
            tried: true,
            ..BatchCost::default()
        });
        for _ in 0..INCOMPRESSIBLE_SKIP_BATCHES {
            assert_eq!(c.codec(), BatchCodec::Raw);
            c.observe(BatchCost {
                stream_len: 1000,
                sent_len: 1000,
                ..BatchCost::default()
            });
        }
        assert_eq!(c.codec(), BatchCodec::Zstd(ADAPTIVE_LEVEL_START));
    }

    #[test]
    fn fixed_levels_never_move() {
        let mut c = LevelChooser::new(CompressLevel::Fixed(7));
        for _ in 0..100 {
            c.observe(batch(1, 100, 0, true));
        }
        assert_eq!(c.codec(), BatchCodec::Zstd(7));
        assert_eq!(
            LevelChooser::new(CompressLevel::Fixed(0)).codec(),
            BatchCodec::Raw
        );
    }
}
