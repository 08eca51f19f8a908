//! What survives a crash of the controller: `cluster.json`, a snapshot of
//! the registry written in the background (coalesced, and spaced by its
//! own cost so that a large cluster is not rewritten per report), and
//! `tokens.log`, an append-only journal of spent bootstrap tokens written
//! at each enrollment (one short line, O(1)).
//!
//! # Guarantees
//! - A launch is in the snapshot before it is made (`tick::launch_batch`
//!   saves synchronously), and so is a scale request (`ops::scale`).
//! - A spent token stays spent across a crash: the journal is appended
//!   before the enrollment is answered, and replayed at load.
//! - Saves are serialised (`save_lock`): two saves never share a temporary
//!   file, and an older snapshot never replaces a newer one.
//!
//! # What a crash may lose, and why that is safe
//! Facts, plan progress, step logs and boot phases reported since the last
//! snapshot: every agent says hello again when it reconnects (facts and
//! progress), and its state follows from that. Terminations since the last
//! snapshot: the instances are gone, so a restarted controller finds them
//! gone and forgets them (the desired size, saved at once, decides whether
//! to replace them).

use super::Cluster;
use crate::pki;
use parking_lot::Mutex;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The journal of spent tokens: one line per enrollment, the node id and
/// the SHA-256 of the certificate issued to it (older lines: the id only).
pub struct Journal {
    path: PathBuf,
    /// The open file (std mutex: one short write per enrollment).
    file: Mutex<Option<std::fs::File>>,
}

impl Journal {
    pub fn new(state_dir: &Path) -> Journal {
        Journal { path: state_dir.join("tokens.log"), file: Mutex::new(None) }
    }

    fn rotated(&self) -> PathBuf {
        self.path.with_extension("log.1")
    }

    /// Records that `node_id`'s token was spent for the certificate with
    /// SHA-256 `cert_sha256` (a crash before the next snapshot must not
    /// lose which certificate the node's sessions present).
    pub fn spent(&self, node_id: &str, cert_sha256: &str) -> std::io::Result<()> {
        let mut guard = self.file.lock();
        if guard.is_none() {
            use std::os::unix::fs::OpenOptionsExt;
            let f = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&self.path)?;
            *guard = Some(f);
        }
        let f = guard.as_mut().expect("opened above");
        f.write_all(format!("{node_id} {cert_sha256}\n").as_bytes())?;
        // On disk before the certificate is handed out, not in a cache.
        f.sync_data()
    }

    /// Before a snapshot is taken: later spends go to a new file; the
    /// current one is kept until the snapshot is on disk.
    fn rotate(&self) -> std::io::Result<()> {
        let mut guard = self.file.lock();
        *guard = None;
        match std::fs::rename(&self.path, self.rotated()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The snapshot holds every spend of the rotated file.
    fn rotation_done(&self) {
        let _ = std::fs::remove_file(self.rotated());
    }

    /// Node ids whose tokens were spent after the snapshot was taken.
    pub fn replay(state_dir: &Path) -> Vec<(String, Option<String>)> {
        let j = Journal::new(state_dir);
        [j.rotated(), j.path.clone()]
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .flat_map(|t| {
                t.lines()
                    .filter_map(|l| {
                        let mut f = l.split_whitespace();
                        Some((f.next()?.to_string(), f.next().map(str::to_string)))
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

impl Cluster {
    fn cluster_file(&self) -> PathBuf {
        self.cfg.state_dir.join("cluster.json")
    }

    /// Writes `cluster.json` if anything changed since the last save.
    pub fn save(&self) -> anyhow::Result<()> {
        let _order = self.save_lock.lock();
        if !self.registry.lock().dirty {
            return Ok(());
        }
        self.journal.rotate()?;
        let json = {
            let mut reg = self.registry.lock();
            reg.dirty = false;
            reg.to_json()
        };
        self.metrics.save_bytes.fetch_add(json.len() as u64, Ordering::Relaxed);
        crate::metrics::Metrics::inc(&self.metrics.saves);
        if let Err(e) = pki::write_private(&self.cluster_file(), &json) {
            // Not saved: try again at the next change.
            self.registry.lock().dirty = true;
            return Err(e.into());
        }
        self.journal.rotation_done();
        Ok(())
    }
}

/// How long the persister waits after a save that took `took` before the
/// next one: at least 100 ms (a burst of reports is one write), and nine
/// times the save's own cost, so that saving takes at most a tenth of the
/// controller's time whatever the cluster's size.
pub fn save_spacing(took: Duration) -> Duration {
    (took * 9).max(Duration::from_millis(100))
}

/// Saves `cluster.json` when the registry changed, spaced by
/// [`save_spacing`]; returns how long the save took.
pub fn save_timed(sh: &Cluster) -> Duration {
    let t0 = Instant::now();
    if let Err(e) = sh.save() {
        tracing::error!("cannot save the cluster state: {e:#}");
    }
    t0.elapsed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spacing_grows_with_the_cost_of_a_save() {
        assert_eq!(save_spacing(Duration::from_millis(1)), Duration::from_millis(100));
        assert_eq!(save_spacing(Duration::from_millis(50)), Duration::from_millis(450));
    }

    #[test]
    fn the_journal_replays_spends_from_both_files_until_the_snapshot_is_written() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::new(d.path());
        j.spent("slave-0001", "aa").unwrap();
        j.rotate().unwrap();
        j.spent("slave-0002", "bb").unwrap();
        let entry = |id: &str, sha: &str| (id.to_string(), Some(sha.to_string()));
        // A crash here: both are replayed.
        assert_eq!(Journal::replay(d.path()), [entry("slave-0001", "aa"), entry("slave-0002", "bb")]);
        j.rotation_done();
        assert_eq!(Journal::replay(d.path()), [entry("slave-0002", "bb")]);
        // A line of an older journal (the id only) still replays.
        std::fs::write(d.path().join("tokens.log"), "slave-0003\n").unwrap();
        assert_eq!(Journal::replay(d.path()), [("slave-0003".to_string(), None)]);
    }
}
