//! The tap journal: an append-only local log of every decided tap, written with group commit.
//!
//! An approval is answered only after its record is on disk (fsync), so an approval the gate
//! has seen survives a crash of the gateway. One writer thread takes records from a bounded
//! queue, writes everything that is waiting as one batch and syncs once for the batch; the queue
//! being full is answered Busy by the caller, never absorbed.
//!
//! Files: `DIR/journal-id` (the journal's identity, made on first open), and
//! `DIR/journal-NNNNNNNNNN.tj`, numbered in order, a new one per start and whenever the
//! current one passes the segment size. Record: `len u32 BE | crc32c(payload) u32 BE | payload`
//! with the payload of [`JournalRecord::encode`]. The writer keeps the current file zeroed a
//! stretch past its last record (a megabyte, extended between batches) and cuts the zeroes off when it moves
//! on or stops, so readers take an all-zero header as the end of the records. A torn record at
//! the end of the newest file (a crash mid-write) is cut off on recovery; it was never
//! acknowledged.
//!
//! The writer publishes how far the journal is durable ([`JournalPosition`]); the settlement
//! forwarder reads records up to that point and never past it, so it never ships a record a
//! crash could still take back.

#![forbid(unsafe_code)]

use bytes::{Buf, BufMut, BytesMut};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tapgate_protocol::{
    Concession, Issuer, Mode, Outcome, Reason, TAG_LEN, Tag, Tap, TapKind, TapResult,
};
use tapgate_runtime::health::{Incident, PartHealth};
use tapgate_runtime::histogram::DurationHistogram;
use tokio::sync::{mpsc, oneshot, watch};

/// Version 2 added the share of the fare the rider pays, version 3 the flags byte, version 4
/// the time an offline upload reached the gateway. Taps decided online are still written as
/// version 3, which holds all they need (and which readers of before version 4 read); records
/// of every earlier version are still read.
const PAYLOAD_VERSION: u8 = 3;
const UPLOAD_PAYLOAD_VERSION: u8 = 4;
/// Size of an encoded payload of a tap decided online.
pub const PAYLOAD_LEN: usize = 81;
/// Size of an encoded payload of an offline upload: an online one's and the upload's time.
pub const UPLOAD_PAYLOAD_LEN: usize = PAYLOAD_LEN + 8;
const PAYLOAD_V1_LEN: usize = 79;
const PAYLOAD_V2_LEN: usize = 80;
/// Flag: the tap repeated a boarding of the same vehicle within the policy's window.
const FLAG_REPEAT_BOARDING: u8 = 1;
/// Flag: a tap the gate approved offline and uploaded later.
const FLAG_OFFLINE: u8 = 2;
const RECORD_HEADER: usize = 8;

/// One decided tap as the journal keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalRecord {
    pub terminal_id: u64,
    /// The Tap frame's tag: lets a resend after a restart be told from a conflicting reuse.
    pub tag: Tag,
    pub tap: Tap,
    /// When the tap happened as the gateway reckons it: when it decided the tap, or for an
    /// offline tap the gate's time of the tap, no later than its upload. Settlement prices and
    /// books by it.
    pub server_time_ms: u64,
    pub area: u32,
    pub mode: Mode,
    pub operator: u16,
    pub result: TapResult,
    /// Share of the full fare the rider pays, in percent, as the gateway's policy set it for
    /// the concession and the card's grade (100 without a concession). Settlement prices with
    /// it, so the policy the tap was decided under is the one it is charged under.
    pub pay_percent: u8,
    /// The card boarded the same vehicle moments before: approved without a second charge.
    pub repeat_boarding: bool,
    /// For a tap the gate approved offline and uploaded later (PROTOCOL.md section 4.7): when
    /// the upload reached the gateway, which is where settlement prices it among the card's
    /// taps (`server_time_ms` is the gate's time of the tap, minutes or hours before). The
    /// result's reason is then the offline rule the tap broke, `Approved` for none. `None`
    /// for a tap decided online.
    pub uploaded_ms: Option<u64>,
}

/// The share a version 1 record's concession paid: version 1 did not record it, and these are
/// the shares every policy shipped while version 1 was written applied.
pub fn version_1_pay_percent(concession: Concession) -> u8 {
    match concession {
        Concession::None => 100,
        Concession::Student => 50,
        _ => 0,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("journal writer has stopped")]
    Stopped,
}

/// The journal's queue is full: answer Busy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("journal queue is full")]
pub struct JournalFull;

impl JournalRecord {
    /// The gate approved the tap offline and uploaded it later.
    pub fn is_offline(&self) -> bool {
        self.uploaded_ms.is_some()
    }

    /// When a gateway had the tap: when it decided it, or received its upload.
    pub fn reached_gateway_ms(&self) -> u64 {
        self.uploaded_ms.unwrap_or(self.server_time_ms)
    }

    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u8(match self.uploaded_ms {
            None => PAYLOAD_VERSION,
            Some(_) => UPLOAD_PAYLOAD_VERSION,
        });
        out.put_u64(self.terminal_id);
        out.put_u64(self.tap.sequence);
        out.put_slice(&self.tag);
        out.put_u64(self.tap.card_id);
        out.put_u8(self.tap.issuer.code());
        out.put_u8(self.tap.kind.code());
        out.put_u16(self.tap.line);
        out.put_u16(self.tap.stop);
        out.put_u64(self.tap.gate_time_ms);
        out.put_u64(self.server_time_ms);
        out.put_u32(self.area);
        out.put_u8(self.mode.code());
        out.put_u16(self.operator);
        out.put_u8(self.result.outcome.code());
        out.put_u8(self.result.reason.code());
        out.put_u8(self.result.concession.code());
        out.put_u32(self.result.fare_fen);
        out.put_u16(self.result.rides_left);
        out.put_u8(self.pay_percent);
        out.put_u8(
            (u8::from(self.repeat_boarding) * FLAG_REPEAT_BOARDING)
                | (u8::from(self.is_offline()) * FLAG_OFFLINE),
        );
        if let Some(uploaded_ms) = self.uploaded_ms {
            out.put_u64(uploaded_ms);
        }
    }

    pub fn decode(mut p: &[u8]) -> Option<Self> {
        let version = match (p.len(), p.first()) {
            (UPLOAD_PAYLOAD_LEN, Some(&UPLOAD_PAYLOAD_VERSION)) => UPLOAD_PAYLOAD_VERSION,
            (PAYLOAD_LEN, Some(&PAYLOAD_VERSION)) => PAYLOAD_VERSION,
            (PAYLOAD_V2_LEN, Some(2)) => 2,
            (PAYLOAD_V1_LEN, Some(1)) => 1,
            _ => return None,
        };
        p.advance(1);
        let terminal_id = p.get_u64();
        let sequence = p.get_u64();
        let mut tag = [0u8; TAG_LEN];
        p.copy_to_slice(&mut tag);
        let card_id = p.get_u64();
        let issuer = Issuer::from_code(p.get_u8())?;
        let kind = TapKind::from_code(p.get_u8())?;
        let line = p.get_u16();
        let stop = p.get_u16();
        let gate_time_ms = p.get_u64();
        let server_time_ms = p.get_u64();
        let area = p.get_u32();
        let mode = Mode::from_code(p.get_u8())?;
        let operator = p.get_u16();
        let outcome = Outcome::from_code(p.get_u8())?;
        let reason = Reason::from_code(p.get_u8())?;
        let concession = Concession::from_code(p.get_u8())?;
        let fare_fen = p.get_u32();
        let rides_left = p.get_u16();
        let pay_percent = match version {
            1 => version_1_pay_percent(concession),
            _ => Some(p.get_u8()).filter(|percent| *percent <= 100)?,
        };
        let flags = match version {
            1 | 2 => 0,
            _ => Some(p.get_u8()).filter(|f| f & !(FLAG_REPEAT_BOARDING | FLAG_OFFLINE) == 0)?,
        };
        let uploaded_ms = match (version, flags & FLAG_OFFLINE != 0) {
            (UPLOAD_PAYLOAD_VERSION, true) => Some(p.get_u64()),
            // Only uploads are written as version 4.
            (UPLOAD_PAYLOAD_VERSION, false) => return None,
            // Uploads journaled before version 4 did not keep the time they arrived; the
            // gate's time of the tap is the best that is known of it.
            (_, true) => Some(server_time_ms),
            (_, false) => None,
        };
        Some(JournalRecord {
            terminal_id,
            tag,
            tap: Tap {
                sequence,
                card_id,
                issuer,
                kind,
                line,
                stop,
                gate_time_ms,
            },
            server_time_ms,
            area,
            mode,
            operator,
            result: TapResult {
                sequence,
                outcome,
                reason,
                concession,
                fare_fen,
                rides_left,
            },
            pay_percent,
            repeat_boarding: flags & FLAG_REPEAT_BOARDING != 0,
            uploaded_ms,
        })
    }
}

/// Journal settings.
#[derive(Debug, Clone)]
pub struct JournalSettings {
    pub dir: PathBuf,
    /// A new file is started once the current one reaches this size.
    pub segment_bytes: u64,
    /// Records waiting for the writer; a full queue is answered Busy.
    pub queue_capacity: usize,
    /// Most records written and synced as one batch.
    pub max_batch: usize,
    /// Least time between the starts of two syncs. Under load this gathers bigger batches, so
    /// fewer syncs are spent per tap (each one costs CPU, notably in a virtual machine); when
    /// taps are sparse it adds nothing, since the previous sync is long past.
    pub min_sync_interval: Duration,
}

pub struct Request {
    record: JournalRecord,
    durable: Option<oneshot::Sender<Result<(), Arc<JournalError>>>>,
}

/// Journal counters.
#[derive(Debug, Default)]
pub struct JournalStats {
    pub records: AtomicU64,
    pub batches: AtomicU64,
    pub syncs: AtomicU64,
    pub bytes: AtomicU64,
    pub write_errors: AtomicU64,
    /// Failing while batches cannot be written and synced (a full or failed disk).
    pub health: PartHealth,
    /// How long writing and syncing a batch takes.
    pub sync_latency: DurationHistogram,
}

tapgate_runtime::log_position! {
    /// A place in the journal: a segment's number and a byte offset in it, `SEGMENT:OFFSET`.
    /// Positions order like the records they separate.
    JournalPosition { segment, offset },
    separator: ':',
    what: "journal position",
    second_may_be_absent: false
}

/// Handle for appending; cheap to clone. The writer thread stops when every handle is gone.
#[derive(Clone)]
pub struct Journal {
    queue: mpsc::Sender<Request>,
    durable: watch::Receiver<JournalPosition>,
    pub stats: Arc<JournalStats>,
}

/// Waits for a durable record.
pub type Durable = oneshot::Receiver<Result<(), Arc<JournalError>>>;

impl Journal {
    /// Recovers the journal in `settings.dir` (creating it if needed), calling `recovered` with
    /// every record in order, then starts the writer on a new segment.
    pub fn open(
        settings: &JournalSettings,
        mut recovered: impl FnMut(JournalRecord),
    ) -> Result<(Journal, JournalWriter), JournalError> {
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| JournalError::Io { path, source }
        };
        fs::create_dir_all(&settings.dir).map_err(io_err(&settings.dir))?;
        journal_id(&settings.dir).map_err(io_err(&settings.dir))?;
        let segments = list_segments(&settings.dir).map_err(io_err(&settings.dir))?;
        for (i, path) in segments.iter().enumerate() {
            let is_newest = i + 1 == segments.len();
            recover_segment(path, is_newest, &mut recovered)?;
        }
        let next_index = segments
            .last()
            .and_then(|p| segment_index(p))
            .map_or(0, |i| i + 1);
        let (queue, rx) = mpsc::channel(settings.queue_capacity.max(1));
        let stats = Arc::new(JournalStats::default());
        let mut writer = SegmentWriter::create(settings, next_index)?;
        // Recovery left every older segment whole; the new one is empty.
        let (durable_tx, durable) = watch::channel(JournalPosition {
            segment: next_index,
            offset: 0,
        });
        let max_batch = settings.max_batch.max(1);
        let min_interval = settings.min_sync_interval;
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("tapgate-journal".into())
            .spawn(move || writer.run(rx, max_batch, min_interval, &thread_stats, &durable_tx))
            .map_err(io_err(&settings.dir))?;
        Ok((
            Journal {
                queue,
                durable,
                stats,
            },
            JournalWriter { thread },
        ))
    }

    /// How far the journal is on disk; changes after every synced batch.
    pub fn durable(&self) -> watch::Receiver<JournalPosition> {
        self.durable.clone()
    }

    /// Claims a place in the queue before the work whose record will fill it, so that work
    /// can be refused (Busy) before it has any effect.
    pub fn reserve(&self) -> Result<JournalSlot<'_>, JournalFull> {
        self.queue
            .try_reserve()
            .map(JournalSlot)
            .map_err(|_| JournalFull)
    }

    /// Queues an approval; the receiver resolves once it is on disk.
    pub fn append_durable(&self, record: JournalRecord) -> Result<Durable, JournalFull> {
        Ok(self.reserve()?.append_durable(record))
    }

    /// Queues a record nobody waits for (a denial). It is written in order with the rest.
    pub fn append(&self, record: JournalRecord) -> Result<(), JournalFull> {
        self.reserve()?.append(record);
        Ok(())
    }
}

/// A claimed place in the journal's queue. It borrows the queue rather than cloning its sender,
/// which would touch the sender count shared by every session on every tap.
pub struct JournalSlot<'a>(mpsc::Permit<'a, Request>);

impl JournalSlot<'_> {
    pub fn append_durable(self, record: JournalRecord) -> Durable {
        let (tx, rx) = oneshot::channel();
        self.0.send(Request {
            record,
            durable: Some(tx),
        });
        rx
    }

    pub fn append(self, record: JournalRecord) {
        self.0.send(Request {
            record,
            durable: None,
        });
    }
}

/// The writer thread; join it after dropping every [`Journal`] handle to be sure all queued
/// records are on disk.
pub struct JournalWriter {
    thread: JoinHandle<()>,
}

impl JournalWriter {
    pub fn join(self) {
        if self.thread.join().is_err() {
            tracing::error!("journal writer thread panicked");
        }
    }
}

/// How far ahead of the records the writer keeps the segment file zeroed, and by how much it
/// extends that space at a time.
///
/// Overwriting blocks that already exist lets `fdatasync` flush only the data; appending would
/// also commit the file's new size to the filesystem journal on every sync. On the development
/// VM's ext4 that is about 135 µs and 58 µs of CPU per sync appending, 92 µs and 40 µs
/// overwriting. One extension, with its own metadata commit, serves about 12,000 records.
const ZEROED_AHEAD: u64 = 1 << 20;

struct SegmentWriter {
    dir: PathBuf,
    segment_bytes: u64,
    index: u64,
    path: PathBuf,
    file: File,
    /// End of the last record written.
    written: u64,
    /// Length of the file, zeros after `written`.
    zeroed: u64,
    zeroing: Incident,
}

impl SegmentWriter {
    fn create(settings: &JournalSettings, index: u64) -> Result<Self, JournalError> {
        let path = settings.dir.join(segment_name(index));
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)
            .map_err(|source| JournalError::Io {
                path: path.clone(),
                source,
            })?;
        sync_dir(&settings.dir);
        Ok(Self {
            dir: settings.dir.clone(),
            segment_bytes: settings.segment_bytes.max(PAYLOAD_LEN as u64),
            index,
            path,
            file,
            written: 0,
            zeroed: 0,
            zeroing: Incident::new("could not zero journal space ahead"),
        })
    }

    /// Zeroes the next stretch of the file once the records come close to the end of what is
    /// zeroed, and syncs it, between batches so no batch waits for it. A failure here costs
    /// only speed: records past the zeroed space simply extend the file.
    fn zero_ahead(&mut self) {
        if self.zeroed.saturating_sub(self.written) >= ZEROED_AHEAD / 4
            || self.written >= self.segment_bytes
        {
            return;
        }
        let from = self.zeroed.max(self.written);
        let zeros = vec![0u8; ZEROED_AHEAD as usize];
        let result = self
            .file
            .write_all_at(&zeros, from)
            .and_then(|()| self.file.sync_data());
        match result {
            Ok(()) => {
                self.zeroed = from + ZEROED_AHEAD;
                self.zeroing.recovered(Instant::now());
            }
            Err(e) => {
                self.zeroing
                    .failed(Instant::now(), format_args!("{}: {e}", self.path.display()));
            }
        }
    }

    /// Cuts the zeroed space off a segment the writer is done with, so a finished segment ends
    /// with its last record.
    fn trim(&mut self) -> io::Result<()> {
        if self.zeroed > self.written {
            self.file.set_len(self.written)?;
            self.zeroed = self.written;
        }
        self.file.sync_all()
    }

    fn run(
        &mut self,
        mut rx: mpsc::Receiver<Request>,
        max_batch: usize,
        min_interval: Duration,
        stats: &JournalStats,
        durable: &watch::Sender<JournalPosition>,
    ) {
        let mut sink = SegmentSink {
            buf: BytesMut::with_capacity(max_batch * (RECORD_HEADER + PAYLOAD_LEN)),
            failing: Incident::new("journal write failed; approvals are withdrawn (answered Busy)"),
            last_sync: Instant::now()
                .checked_sub(min_interval)
                .unwrap_or_else(Instant::now),
            min_interval,
            writer: self,
            stats,
            durable,
        };
        write_batches(&mut rx, max_batch, &mut sink);
        if let Err(e) = self.trim() {
            tracing::error!(error = %e, "final journal sync failed");
        }
    }

    fn write_batch(&mut self, bytes: &[u8]) -> Result<(), JournalError> {
        if self.written >= self.segment_bytes {
            self.trim().map_err(|source| JournalError::Io {
                path: self.path.clone(),
                source,
            })?;
            let next = SegmentWriter::create(
                &JournalSettings {
                    dir: self.dir.clone(),
                    segment_bytes: self.segment_bytes,
                    queue_capacity: 1,
                    max_batch: 1,
                    min_sync_interval: Duration::ZERO,
                },
                self.index + 1,
            )?;
            *self = next;
        }
        let io = |source| JournalError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.write_all_at(bytes, self.written).map_err(io)?;
        self.file.sync_data().map_err(|source| JournalError::Io {
            path: self.path.clone(),
            source,
        })?;
        self.written += bytes.len() as u64;
        Ok(())
    }
}

/// Where the writer takes its requests from: the journal's bounded queue (a loom queue in the
/// models).
trait Requests {
    /// The next request, waiting for one; `None` once every handle is gone and the queue is
    /// empty, so what was queued before the last handle went is still written.
    fn next_blocking(&mut self) -> Option<Request>;
    /// The next request if one is already queued.
    fn next_queued(&mut self) -> Option<Request>;
}

impl Requests for mpsc::Receiver<Request> {
    fn next_blocking(&mut self) -> Option<Request> {
        self.blocking_recv()
    }

    fn next_queued(&mut self) -> Option<Request> {
        self.try_recv().ok()
    }
}

/// What the writer does with a batch (the segment files; a record of what was synced in the
/// models).
trait BatchSink {
    /// Called once a batch has its first request, before the rest are gathered.
    fn before_gathering(&mut self) {}
    /// Writes and syncs the batch.
    fn write(&mut self, batch: &[Request]) -> Result<(), Arc<JournalError>>;
    /// Called after the batch's waiters are released.
    fn after_release(&mut self) {}
}

/// The writer's hand-off: requests are taken in batches of up to `max_batch`, each batch is
/// written and synced before any of its waiters is released, and every waiter is released with
/// the outcome, the error included. So no approval is answered before it is durable, and none
/// is left waiting when a write fails or the journal stops.
fn write_batches(requests: &mut impl Requests, max_batch: usize, sink: &mut impl BatchSink) {
    let mut batch = Vec::with_capacity(max_batch);
    while let Some(first) = requests.next_blocking() {
        sink.before_gathering();
        batch.push(first);
        while batch.len() < max_batch {
            match requests.next_queued() {
                Some(next) => batch.push(next),
                None => break,
            }
        }
        let result = sink.write(&batch);
        for request in batch.drain(..) {
            if let Some(done) = request.durable {
                // The session may have gone; then nobody needs the answer.
                let _ = done.send(result.clone());
            }
        }
        sink.after_release();
    }
}

/// The journal's segment files as the writer's sink: one write and one `fdatasync` per batch,
/// the durable position moved after each, zeroes kept ahead between batches.
struct SegmentSink<'a> {
    writer: &'a mut SegmentWriter,
    buf: BytesMut,
    failing: Incident,
    last_sync: Instant,
    min_interval: Duration,
    stats: &'a JournalStats,
    durable: &'a watch::Sender<JournalPosition>,
}

impl BatchSink for SegmentSink<'_> {
    fn before_gathering(&mut self) {
        let wait = self.min_interval.saturating_sub(self.last_sync.elapsed());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        self.last_sync = Instant::now();
    }

    fn write(&mut self, batch: &[Request]) -> Result<(), Arc<JournalError>> {
        let (buf, stats) = (&mut self.buf, self.stats);
        buf.clear();
        for request in batch {
            let start = buf.len();
            buf.put_u64(0);
            request.record.encode(buf);
            let payload = &buf[start + RECORD_HEADER..];
            let (len, crc) = (payload.len() as u32, crc32c::crc32c(payload));
            buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
            buf[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
        }
        let started = Instant::now();
        let result = self.writer.write_batch(buf).map_err(Arc::new);
        stats.sync_latency.record(started.elapsed());
        stats.batches.fetch_add(1, Ordering::Relaxed);
        match &result {
            Ok(()) => {
                stats.health.ok();
                self.failing.recovered(Instant::now());
                stats.syncs.fetch_add(1, Ordering::Relaxed);
                stats
                    .records
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                stats.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
                let synced = JournalPosition {
                    segment: self.writer.index,
                    offset: self.writer.written,
                };
                let before = self.durable.send_replace(synced);
                // Approvals are released by this position: it only moves forward.
                debug_assert!(
                    before <= synced,
                    "durable position went back: {before:?} -> {synced:?}"
                );
            }
            Err(e) => {
                stats.write_errors.fetch_add(1, Ordering::Relaxed);
                stats
                    .health
                    .fail(Instant::now(), format_args!("cannot write: {e}"));
                self.failing.failed(Instant::now(), e);
            }
        }
        result
    }

    fn after_release(&mut self) {
        self.writer.zero_ahead();
    }
}

fn segment_name(index: u64) -> String {
    format!("journal-{index:010}.tj")
}

fn segment_index(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_prefix("journal-")?
        .strip_suffix(".tj")?
        .parse()
        .ok()
}

const JOURNAL_ID_FILE: &str = "journal-id";

/// This journal's identity, made up when it is first opened: settlement ties its shipping
/// checkpoint to it, so two gateways configured with the same node name cannot resume from each
/// other's place.
/// The journal's identity if it has one; reads only.
pub fn existing_journal_id(dir: &Path) -> Option<String> {
    fs::read_to_string(dir.join(JOURNAL_ID_FILE))
        .ok()
        .map(|id| id.trim().to_owned())
        .filter(|id| !id.is_empty())
}

pub fn journal_id(dir: &Path) -> io::Result<String> {
    let path = dir.join(JOURNAL_ID_FILE);
    match fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let id = format!("{:016x}", rand::random::<u64>());
    let temporary = dir.join(format!("{JOURNAL_ID_FILE}.new"));
    fs::write(&temporary, &id)?;
    File::open(&temporary)?.sync_all()?;
    fs::rename(&temporary, &path)?;
    sync_dir(dir);
    Ok(id)
}

/// The journal's segment files, oldest first.
pub fn list_segments(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut segments: Vec<(u64, PathBuf)> = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if let Some(index) = segment_index(&path) {
            segments.push((index, path));
        }
    }
    segments.sort();
    Ok(segments.into_iter().map(|(_, p)| p).collect())
}

/// Reads the valid records of one segment. Returns how many bytes they span and whether the
/// segment ends cleanly after them (nothing, or only the writer's zeroed space, follows).
pub fn read_segment(path: &Path, mut each: impl FnMut(JournalRecord)) -> io::Result<(u64, bool)> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    let (used, tail) = parse_records(&bytes, |_, record| each(record));
    Ok((used as u64, tail == Tail::End))
}

/// What follows the whole, valid records at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tail {
    /// Nothing, or only zeros: the space the writer zeroes ahead of itself.
    End,
    /// A record cut short: by the end of the buffer, or by the zeroed space (a crash mid-write).
    Cut,
    /// A complete record that fails its checksum or does not decode, with data after it.
    Damaged,
}

/// Calls `each` with the whole, valid records at the start of `bytes`. Returns how many bytes
/// they span and what follows them.
/// Calls `each` with every whole record and the offset in `bytes` where it starts.
fn parse_records(bytes: &[u8], mut each: impl FnMut(usize, JournalRecord)) -> (usize, Tail) {
    let mut used = 0usize;
    while let Some(header) = bytes.get(used..used + RECORD_HEADER) {
        if header.iter().all(|&b| b == 0) {
            let zeros_only = bytes[used..].iter().all(|&b| b == 0);
            return (used, if zeros_only { Tail::End } else { Tail::Damaged });
        }
        let len = u32::from_be_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_be_bytes(header[4..].try_into().expect("4 bytes"));
        let Some(payload) = bytes.get(used + RECORD_HEADER..used + RECORD_HEADER + len) else {
            return (used, Tail::Cut);
        };
        let record = (crc32c::crc32c(payload) == crc)
            .then(|| JournalRecord::decode(payload))
            .flatten();
        let Some(record) = record else {
            // A batch torn by a crash leaves a partial record before the zeroed space.
            let zeros_follow = bytes[used + RECORD_HEADER + len..].iter().all(|&b| b == 0);
            return (
                used,
                if zeros_follow {
                    Tail::Cut
                } else {
                    Tail::Damaged
                },
            );
        };
        each(used, record);
        used += RECORD_HEADER + len;
    }
    if used == bytes.len() {
        (used, Tail::End)
    } else {
        (used, Tail::Cut)
    }
}

/// Journal bytes and whole records from `from` up to `to` (a durable end): how far a reader at
/// `from` is behind. Finished segments count by their length on disk, so it stays right however
/// many segments lie between.
pub fn distance(dir: &Path, from: JournalPosition, to: JournalPosition) -> io::Result<(u64, u64)> {
    if to <= from {
        return Ok((0, 0));
    }
    let bytes = if from.segment == to.segment {
        to.offset - from.offset
    } else {
        let mut bytes = to.offset;
        for index in from.segment..to.segment {
            let len = match fs::metadata(dir.join(segment_name(index))) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
                Err(e) => return Err(e),
            };
            bytes += if index == from.segment {
                len.saturating_sub(from.offset)
            } else {
                len
            };
        }
        bytes
    };
    Ok((bytes, bytes / (RECORD_HEADER + PAYLOAD_LEN) as u64))
}

/// Records read by [`read_from`].
#[derive(Debug, Default)]
pub struct JournalRead {
    pub records: Vec<JournalRecord>,
    /// Where each of `records` starts, in the same order.
    pub positions: Vec<JournalPosition>,
    /// Where to read from next.
    pub next: JournalPosition,
    /// A damaged record at `next`: nothing after it in that segment can be trusted. The caller
    /// decides whether to skip to [`next_segment`].
    pub damaged: bool,
}

/// Reads up to `max` records from `from`, never past `until` (the durable end while a gateway
/// writes; the end of every file for a stopped one).
pub fn read_from(
    dir: &Path,
    from: JournalPosition,
    until: Option<JournalPosition>,
    max: usize,
) -> Result<JournalRead, ReadError> {
    use std::io::{Seek, SeekFrom};
    let segments = match until {
        // Following a running gateway inside its current segment, the usual case: no need to
        // list the directory on every read.
        Some(u) if u.segment == from.segment => vec![dir.join(segment_name(u.segment))],
        _ => list_segments(dir).map_err(|source| ReadError {
            path: dir.to_owned(),
            source,
        })?,
    };
    let mut at = from;
    let mut records = Vec::new();
    let mut positions = Vec::new();
    let newest = segments.last().and_then(|p| segment_index(p));
    for path in segments {
        let Some(index) = segment_index(&path) else {
            continue;
        };
        if index < at.segment {
            continue;
        }
        if index > at.segment {
            at = JournalPosition {
                segment: index,
                offset: 0,
            };
        }
        if until.is_some_and(|u| at >= u) || records.len() >= max {
            break;
        }
        let io = |source| ReadError {
            path: path.clone(),
            source,
        };
        let mut file = File::open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let end = match until {
            Some(u) if u.segment == index => u.offset.min(len),
            _ => len,
        };
        let want = ((max - records.len()) * (RECORD_HEADER + PAYLOAD_LEN)) as u64;
        let stop = end.min(at.offset.saturating_add(want));
        if stop <= at.offset {
            if until.is_none_or(|u| u.segment > index) {
                continue;
            }
            break;
        }
        let mut bytes = vec![0; (stop - at.offset) as usize];
        file.seek(SeekFrom::Start(at.offset)).map_err(io)?;
        file.read_exact(&mut bytes).map_err(io)?;
        let (used, tail) = parse_records(&bytes, |start, r| {
            records.push(r);
            positions.push(JournalPosition {
                segment: index,
                offset: at.offset + start as u64,
            });
        });
        at.offset += used as u64;
        if tail == Tail::Damaged {
            return Ok(JournalRead {
                records,
                positions,
                next: at,
                damaged: true,
            });
        }
        if tail == Tail::End && used < bytes.len() {
            // The zeroed space after a stopped gateway's last record: this segment is done.
            if records.len() >= max {
                break;
            }
            continue;
        }
        if used < bytes.len() {
            // A record cut short: by this read's size (the next read takes it whole), by a
            // crash at the end of the newest segment (recovery cuts it), or inside a segment
            // that later ones follow, which is damage.
            let torn_inside = stop == len && newest.is_some_and(|n| n > index);
            return Ok(JournalRead {
                records,
                positions,
                next: at,
                damaged: torn_inside,
            });
        }
        if records.len() >= max {
            break;
        }
    }
    Ok(JournalRead {
        records,
        positions,
        next: at,
        damaged: false,
    })
}

#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct ReadError {
    path: PathBuf,
    #[source]
    source: io::Error,
}

/// Where the segment after `at`'s begins: the way past damage.
pub fn next_segment(at: JournalPosition) -> JournalPosition {
    JournalPosition {
        segment: at.segment + 1,
        offset: 0,
    }
}

fn recover_segment(
    path: &Path,
    is_newest: bool,
    recovered: &mut impl FnMut(JournalRecord),
) -> Result<(), JournalError> {
    let io_err = |source| JournalError::Io {
        path: path.to_owned(),
        source,
    };
    let (valid_len, clean) = read_segment(path, recovered).map_err(io_err)?;
    let file_len = fs::metadata(path).map_err(io_err)?.len();
    if clean && valid_len == file_len {
        return Ok(());
    }
    if clean {
        // The zeroed space of a segment whose writer did not stop cleanly.
        tracing::debug!(path = %path.display(), valid_len, "trimming zeroed space off a journal segment");
    } else if is_newest {
        tracing::warn!(path = %path.display(), valid_len, "cutting a torn record off the journal's end");
    } else {
        tracing::error!(path = %path.display(), valid_len, "journal segment is damaged before its end; records after the damage are skipped");
        return Ok(());
    }
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| {
            f.set_len(valid_len)?;
            f.sync_all()
        })
        .map_err(io_err)?;
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(dir = %dir.display(), error = %e, "could not sync journal directory");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An approved metro entry, tap `sequence` of one gate (the loom models use it too).
    pub(super) fn record(sequence: u64) -> JournalRecord {
        JournalRecord {
            terminal_id: 77,
            tag: [sequence as u8; 16],
            tap: Tap {
                sequence,
                card_id: 1000 + sequence,
                issuer: Issuer::SichuanTianfuTong,
                kind: TapKind::Entry,
                line: 3,
                stop: 9,
                gate_time_ms: 1_000,
            },
            server_time_ms: 2_000,
            area: 500103,
            mode: Mode::Metro,
            operator: 2,
            result: TapResult {
                sequence,
                outcome: Outcome::Approve,
                reason: Reason::Approved,
                concession: Concession::Elder,
                fare_fen: 0,
                rides_left: 41,
            },
            pay_percent: 0,
            repeat_boarding: false,
            uploaded_ms: None,
        }
    }

    fn settings(dir: &Path, segment_bytes: u64) -> JournalSettings {
        JournalSettings {
            dir: dir.to_owned(),
            segment_bytes,
            queue_capacity: 64,
            max_batch: 16,
            min_sync_interval: Duration::from_micros(200),
        }
    }

    #[test]
    fn payload_round_trips_at_its_stated_size() {
        let mut buf = BytesMut::new();
        record(5).encode(&mut buf);
        assert_eq!(buf.len(), PAYLOAD_LEN);
        assert_eq!(JournalRecord::decode(&buf), Some(record(5)));
        let upload = Some(record(5).server_time_ms + 3_600_000);
        for (repeat_boarding, uploaded_ms) in [(true, None), (false, upload), (true, upload)] {
            let flagged = JournalRecord {
                repeat_boarding,
                uploaded_ms,
                ..record(5)
            };
            let mut buf = BytesMut::new();
            flagged.encode(&mut buf);
            let size = if uploaded_ms.is_some() {
                UPLOAD_PAYLOAD_LEN
            } else {
                PAYLOAD_LEN
            };
            assert_eq!(buf.len(), size);
            assert_eq!(JournalRecord::decode(&buf), Some(flagged));
        }
    }

    #[test]
    fn an_upload_journaled_before_its_arrival_was_kept_reads_as_arrived_at_its_gate_time() {
        let upload = JournalRecord {
            uploaded_ms: Some(record(5).server_time_ms + 3_600_000),
            ..record(5)
        };
        let mut buf = BytesMut::new();
        upload.encode(&mut buf);
        let mut v3 = buf.clone();
        v3[0] = PAYLOAD_VERSION;
        v3.truncate(PAYLOAD_LEN);
        let read = JournalRecord::decode(&v3).unwrap();
        assert_eq!(read.uploaded_ms, Some(upload.server_time_ms));
        // Version 4 is only ever an upload.
        let mut unflagged = buf;
        unflagged[PAYLOAD_LEN - 1] = 0;
        assert_eq!(JournalRecord::decode(&unflagged), None);
    }

    #[test]
    fn older_records_read_with_the_share_their_concession_paid() {
        let mut buf = BytesMut::new();
        let student = JournalRecord {
            result: TapResult {
                concession: Concession::Student,
                ..record(5).result
            },
            pay_percent: 50,
            ..record(5)
        };
        student.encode(&mut buf);
        // Version 2 was this layout without the flags, version 1 without the share too.
        let mut v2 = buf.clone();
        v2[0] = 2;
        v2.truncate(PAYLOAD_V2_LEN);
        assert_eq!(JournalRecord::decode(&v2), Some(student));
        buf[0] = 1;
        buf.truncate(PAYLOAD_V1_LEN);
        assert_eq!(JournalRecord::decode(&buf), Some(student));
        // A share above 100 % or an unknown flag is not a record.
        for (at, value) in [(PAYLOAD_LEN - 2, 101), (PAYLOAD_LEN - 1, 4)] {
            let mut buf = BytesMut::new();
            record(5).encode(&mut buf);
            buf[at] = value;
            assert_eq!(JournalRecord::decode(&buf), None);
        }
    }

    #[tokio::test]
    async fn durable_appends_are_recovered_after_reopen_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, writer) = Journal::open(&settings(dir.path(), 200), |_| {}).unwrap();
        append_durably(&journal, 1..=10).await;
        drop(journal);
        tokio::task::spawn_blocking(|| writer.join()).await.unwrap();
        let segments = list_segments(dir.path()).unwrap();
        assert!(segments.len() > 1);
        // The zeroes ahead of the records were trimmed off every segment the writer left.
        let on_disk: u64 = segments
            .iter()
            .map(|s| fs::metadata(s).unwrap().len())
            .sum();
        assert_eq!(on_disk, 10 * RECORD_LEN);
        let mut seen = Vec::new();
        let (journal, writer) =
            Journal::open(&settings(dir.path(), 200), |r| seen.push(r.tap.sequence)).unwrap();
        assert_eq!(seen, (1..=10).collect::<Vec<_>>());
        drop(journal);
        writer.join();
    }

    /// Appends the records of these sequence numbers, each waited for until it is on disk.
    async fn append_durably(journal: &Journal, sequences: std::ops::RangeInclusive<u64>) {
        for s in sequences {
            journal
                .append_durable(record(s))
                .unwrap()
                .await
                .unwrap()
                .unwrap();
        }
    }

    /// A segment's bytes holding the records of these sequence numbers.
    fn segment_bytes(sequences: std::ops::RangeInclusive<u64>) -> BytesMut {
        let mut bytes = BytesMut::new();
        for s in sequences {
            bytes.put_u32(PAYLOAD_LEN as u32);
            let mut payload = BytesMut::new();
            record(s).encode(&mut payload);
            bytes.put_u32(crc32c::crc32c(&payload));
            bytes.extend_from_slice(&payload);
        }
        bytes
    }

    /// Length of one record on disk.
    const RECORD_LEN: u64 = (RECORD_HEADER + PAYLOAD_LEN) as u64;

    /// Opens the journal in `dir` as a restarting gateway does, then closes it; returns the
    /// sequence numbers recovery replayed.
    fn recovered_sequences(dir: &Path) -> Vec<u64> {
        let mut seen = Vec::new();
        let (journal, writer) =
            Journal::open(&settings(dir, 1 << 20), |r| seen.push(r.tap.sequence)).unwrap();
        drop(journal);
        writer.join();
        seen
    }

    #[tokio::test]
    async fn the_forwarders_reads_stop_at_the_durable_end_and_resume_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        // Two records per segment.
        let segment = 2 * (RECORD_HEADER + PAYLOAD_LEN) as u64;
        let (journal, writer) = Journal::open(&settings(dir.path(), segment), |_| {}).unwrap();
        let durable = journal.durable();
        append_durably(&journal, 1..=5).await;
        let end = *durable.borrow();
        assert_eq!(end.segment, 2, "five records, two per segment");
        let sequences = |read: &JournalRead| -> Vec<u64> {
            read.records.iter().map(|r| r.tap.sequence).collect()
        };
        let first = read_from(dir.path(), JournalPosition::default(), Some(end), 3).unwrap();
        assert_eq!(sequences(&first), [1, 2, 3]);
        let rest = read_from(dir.path(), first.next, Some(end), 10).unwrap();
        assert_eq!(sequences(&rest), [4, 5]);
        assert_eq!(rest.next, end);
        assert!(!rest.damaged);
        // Nothing is read past the durable end, however much is asked for.
        let before_last = JournalPosition {
            segment: end.segment,
            offset: 0,
        };
        let bounded = read_from(dir.path(), first.next, Some(before_last), 10).unwrap();
        assert_eq!(sequences(&bounded), [4]);
        drop(journal);
        tokio::task::spawn_blocking(|| writer.join()).await.unwrap();
    }

    #[test]
    fn damage_inside_a_segment_that_others_follow_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = segment_bytes(1..=3);
        let second = RECORD_HEADER + PAYLOAD_LEN;
        bytes[second + RECORD_HEADER + 5] ^= 1;
        fs::write(dir.path().join(segment_name(0)), &bytes).unwrap();
        fs::write(dir.path().join(segment_name(1)), b"").unwrap();
        let read = read_from(dir.path(), JournalPosition::default(), None, 10).unwrap();
        assert_eq!(read.records.len(), 1);
        assert!(read.damaged);
        assert_eq!(read.next.offset, second as u64);
        assert_eq!(next_segment(read.next).segment, 1);
    }

    #[tokio::test]
    async fn a_writer_zeroes_ahead_and_trims_the_zeroes_when_it_stops() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, writer) = Journal::open(&settings(dir.path(), 1 << 30), |_| {}).unwrap();
        append_durably(&journal, 1..=3).await;
        let path = list_segments(dir.path()).unwrap().pop().unwrap();
        // Zeroed after the first batch, one record; the next two records overwrite zeros.
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            RECORD_LEN + ZEROED_AHEAD
        );
        let read = read_from(dir.path(), JournalPosition::default(), None, 10).unwrap();
        assert_eq!(read.records.len(), 3);
        assert!(!read.damaged);
        drop(journal);
        tokio::task::spawn_blocking(|| writer.join()).await.unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), 3 * RECORD_LEN);
    }

    #[test]
    fn zeroed_space_left_by_a_crash_ends_a_segment_and_is_trimmed_on_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join(segment_name(0));
        let mut bytes = segment_bytes(1..=3);
        bytes.extend_from_slice(&[0; 4096]);
        fs::write(&first, &bytes).unwrap();
        fs::write(dir.path().join(segment_name(1)), segment_bytes(4..=5)).unwrap();
        let mut count = 0;
        assert_eq!(
            read_segment(&first, |_| count += 1).unwrap(),
            (3 * RECORD_LEN, true)
        );
        let read = read_from(dir.path(), JournalPosition::default(), None, 10).unwrap();
        let sequences: Vec<u64> = read.records.iter().map(|r| r.tap.sequence).collect();
        assert_eq!(sequences, [1, 2, 3, 4, 5]);
        assert!(!read.damaged);
        assert_eq!(recovered_sequences(dir.path()), [1, 2, 3, 4, 5]);
        assert_eq!(fs::metadata(&first).unwrap().len(), 3 * RECORD_LEN);
    }

    #[test]
    fn a_record_torn_into_the_zeroed_space_is_cut_not_reported_as_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(segment_name(0));
        let mut bytes = segment_bytes(1..=3);
        let full = bytes.len();
        bytes[full - 20..].fill(0);
        bytes.extend_from_slice(&[0; 4096]);
        fs::write(&path, &bytes).unwrap();
        let read = read_from(dir.path(), JournalPosition::default(), None, 10).unwrap();
        assert_eq!(read.records.len(), 2);
        assert!(!read.damaged);
        assert_eq!(recovered_sequences(dir.path()), [1, 2]);
        assert_eq!(fs::metadata(&path).unwrap().len(), 2 * RECORD_LEN);
    }

    #[test]
    fn records_after_a_zeroed_gap_are_damage() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = segment_bytes(1..=1);
        bytes.extend_from_slice(&[0; 100]);
        bytes.extend_from_slice(&segment_bytes(2..=2));
        fs::write(dir.path().join(segment_name(0)), &bytes).unwrap();
        fs::write(dir.path().join(segment_name(1)), b"").unwrap();
        let read = read_from(dir.path(), JournalPosition::default(), None, 10).unwrap();
        assert_eq!(read.records.len(), 1);
        assert!(read.damaged);
    }

    #[test]
    fn a_journal_keeps_its_identity() {
        let dir = tempfile::tempdir().unwrap();
        let id = journal_id(dir.path()).unwrap();
        assert_eq!(id.len(), 16);
        assert_eq!(journal_id(dir.path()).unwrap(), id);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(journal_id(other.path()).unwrap(), id);
    }

    #[test]
    fn journal_positions_print_and_parse() {
        let p = JournalPosition {
            segment: 12,
            offset: 3480,
        };
        assert_eq!(p.to_string().parse::<JournalPosition>(), Ok(p));
        assert!("12".parse::<JournalPosition>().is_err());
        assert!("a:1".parse::<JournalPosition>().is_err());
    }

    #[test]
    fn a_torn_tail_is_cut_and_earlier_records_survive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(segment_name(0));
        let bytes = segment_bytes(1..=3);
        let full = bytes.len();
        fs::write(&path, &bytes[..full - 10]).unwrap();
        assert_eq!(recovered_sequences(dir.path()), [1, 2]);
        assert_eq!(fs::metadata(&path).unwrap().len(), 2 * RECORD_LEN);
    }

    #[test]
    fn a_flipped_bit_fails_the_crc() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(segment_name(0));
        let mut bytes = BytesMut::new();
        let mut payload = BytesMut::new();
        record(1).encode(&mut payload);
        bytes.put_u32(PAYLOAD_LEN as u32);
        bytes.put_u32(crc32c::crc32c(&payload));
        bytes.extend_from_slice(&payload);
        bytes[20] ^= 0x04;
        fs::write(&path, &bytes).unwrap();
        let mut count = 0;
        let (valid, clean) = read_segment(&path, |_| count += 1).unwrap();
        assert_eq!((count, valid, clean), (0, 0, false));
    }

    #[test]
    fn a_full_queue_is_reported_not_absorbed() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings(dir.path(), 1 << 20);
        s.queue_capacity = 1;
        let (journal, writer) = Journal::open(&s, |_| {}).unwrap();
        let mut full = false;
        for i in 0..10_000 {
            if journal.append(record(i + 1)).is_err() {
                full = true;
                break;
            }
        }
        assert!(full, "a one-slot queue must fill up under a burst");
        drop(journal);
        writer.join();
    }
}

/// The writer's hand-off under loom (`scripts/test`; once each as ordinary tests): sessions
/// queue approvals while the writer gathers, writes and releases batches and the last handle
/// goes away.
#[cfg(test)]
mod loom_models {
    use super::tests::record;
    use super::*;
    use std::collections::VecDeque;
    use tapgate_runtime::sync::{self, Condvar, Mutex, block_on, model_bounded, thread};

    /// Three threads around a mutex and a condition variable have more interleavings than the
    /// suite can walk; every one with up to this many forced switches is checked.
    const PREEMPTIONS: usize = 3;

    /// The journal's bounded queue, reduced to what the writer relies on: requests come out in
    /// order, and the end comes only after the last handle is gone and the queue is empty.
    #[derive(Default)]
    struct Queue {
        state: Mutex<(VecDeque<Request>, usize)>,
        changed: Condvar,
    }

    /// A session's handle on the queue.
    struct Handle(sync::Arc<Queue>);

    impl Handle {
        fn new(queue: &sync::Arc<Queue>) -> Handle {
            queue.state.lock().unwrap().1 += 1;
            Handle(queue.clone())
        }

        fn append_durable(&self, sequence: u64) -> Durable {
            let (done, durable) = oneshot::channel();
            let request = Request {
                record: record(sequence),
                durable: Some(done),
            };
            self.0.state.lock().unwrap().0.push_back(request);
            self.0.changed.notify_one();
            durable
        }
    }

    impl Drop for Handle {
        fn drop(&mut self) {
            self.0.state.lock().unwrap().1 -= 1;
            self.0.changed.notify_one();
        }
    }

    struct Receiver(sync::Arc<Queue>);

    impl Requests for Receiver {
        fn next_blocking(&mut self) -> Option<Request> {
            let mut state = self.0.state.lock().unwrap();
            loop {
                if let Some(request) = state.0.pop_front() {
                    return Some(request);
                }
                if state.1 == 0 {
                    return None;
                }
                state = self.0.changed.wait(state).unwrap();
            }
        }

        fn next_queued(&mut self) -> Option<Request> {
            self.0.state.lock().unwrap().0.pop_front()
        }
    }

    /// Records which taps a write made durable, or fails every write.
    struct Disk {
        synced: sync::Arc<Mutex<Vec<u64>>>,
        fails: bool,
    }

    impl BatchSink for Disk {
        fn write(&mut self, batch: &[Request]) -> Result<(), Arc<JournalError>> {
            if self.fails {
                return Err(Arc::new(JournalError::Io {
                    path: PathBuf::from("model"),
                    source: io::Error::other("disk full"),
                }));
            }
            let mut synced = self.synced.lock().unwrap();
            synced.extend(batch.iter().map(|r| r.record.tap.sequence));
            Ok(())
        }
    }

    /// Two sessions each queue an approval and wait for it, then let go of the journal; the
    /// writer runs batches of two until the last handle is gone. Returns what each session
    /// was told and what the disk holds at that moment.
    fn two_sessions(fails: bool) -> Vec<(Result<(), ()>, Vec<u64>)> {
        let queue = sync::Arc::new(Queue::default());
        let synced = sync::Arc::new(Mutex::new(Vec::new()));
        let sessions: Vec<_> = (1..=2)
            .map(|sequence| {
                let handle = Handle::new(&queue);
                let synced = synced.clone();
                thread::spawn(move || {
                    let durable = handle.append_durable(sequence);
                    drop(handle);
                    let told = match block_on(durable) {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(_)) => Err(()),
                        Err(_) => panic!("tap {sequence}: its waiter was dropped unreleased"),
                    };
                    (told, synced.lock().unwrap().clone())
                })
            })
            .collect();
        let mut disk = Disk {
            synced: synced.clone(),
            fails,
        };
        write_batches(&mut Receiver(queue), 2, &mut disk);
        sessions
            .into_iter()
            .map(|s| s.join().expect("session"))
            .collect()
    }

    /// An approval is released only once the batch holding it is on disk, whichever way the
    /// sessions' appends, the writer's gathering and the last handle's drop interleave.
    #[test]
    fn an_approval_is_released_only_after_its_batch_is_written() {
        model_bounded(PREEMPTIONS, || {
            for (sequence, (told, on_disk)) in (1..).zip(two_sessions(false)) {
                assert_eq!(told, Ok(()));
                assert!(on_disk.contains(&sequence), "tap {sequence} released early");
            }
        });
    }

    /// A batch that cannot be written releases every waiter with the error (the gateway
    /// answers them Busy): none is told it is durable, none waits for ever.
    #[test]
    fn a_failed_write_releases_every_waiter_with_the_error() {
        model_bounded(PREEMPTIONS, || {
            for (told, on_disk) in two_sessions(true) {
                assert_eq!(told, Err(()));
                assert!(on_disk.is_empty());
            }
        });
    }
}
