//! What the agent keeps in `control.data_dir`: its key (0600, made here, never sent), certificate
//! and trust bundle, the identities of the services registered to it (`svc-<name>.pem/.key`), and
//! `control.json` (server, node, ID, validity).
//!
//! These files change together, so they are written as one set: a new generation directory
//! (`gen-<n>/`) gets every file (unchanged ones hard-linked from the current generation, new ones
//! through the one identity-file writer: mode from the first byte, fsync, rename), then the
//! `current` symlink is switched to it with one rename, and the data dir is fsynced. The names
//! users and configs see (`node.pem`, `node.key`, ...) are symlinks through `current`. A crash at
//! any instant leaves `current` at the old set or the new one, never a key beside a certificate
//! it does not match. The previous generation is kept; older ones are removed.

use super::ControlError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tapproof_api::IssuedIdentity;
use tapproof_tls::IdentityFiles;

const NODE_CERT: &str = "node.pem";
const NODE_KEY: &str = "node.key";
const BUNDLE: &str = "bundle.pem";
const STATE: &str = "control.json";
const CURRENT: &str = "current";
const GEN_PREFIX: &str = "gen-";

/// What the agent remembers between starts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ControlState {
    pub server: String,
    pub node: String,
    pub id: String,
    pub issued_at: i64,
    pub not_after: i64,
    /// The certificate's lifetime as the server gave it (not_after less the server's time of
    /// issue, both by the server's clock); 0 in a state file written before it was kept.
    #[serde(default)]
    pub lifetime_s: i64,
    /// Services registered to this node; their identities live in `svc-<name>.pem` / `.key`.
    #[serde(default)]
    pub services: Vec<String>,
}

pub fn identity_files(data_dir: &Path) -> IdentityFiles {
    IdentityFiles {
        cert: data_dir.join(NODE_CERT),
        key: data_dir.join(NODE_KEY),
        bundle: data_dir.join(BUNDLE),
    }
}

/// The identity files of `service` (registered to this node) in the current generation, so that
/// a renewal cannot pair a new certificate with an old key; `None` before the first join.
pub(crate) fn service_identity_files(data_dir: &Path, service: &str) -> Option<IdentityFiles> {
    let generation = data_dir.join(std::fs::read_link(data_dir.join(CURRENT)).ok()?);
    Some(IdentityFiles {
        cert: generation.join(format!("svc-{service}.pem")),
        key: generation.join(format!("svc-{service}.key")),
        bundle: generation.join(BUNDLE),
    })
}

pub(crate) fn state_path(data_dir: &Path) -> PathBuf {
    data_dir.join(STATE)
}

pub(crate) fn read_state(data_dir: &Path) -> Option<ControlState> {
    serde_json::from_slice(&std::fs::read(state_path(data_dir)).ok()?).ok()
}

pub(crate) fn data_err(path: &Path, e: impl std::fmt::Display) -> ControlError {
    ControlError::DataDir {
        path: path.to_owned(),
        detail: e.to_string(),
    }
}

/// A new generation of the identity set being written; nothing is visible until `commit`.
pub(crate) struct Staged {
    data_dir: PathBuf,
    dir: PathBuf,
    names: Vec<String>,
}

impl Staged {
    /// Starts generation n+1 holding every file of the current one.
    pub(crate) fn begin(data_dir: &Path) -> Result<Self, ControlError> {
        migrate_flat_layout(data_dir)?;
        let current = current_generation(data_dir);
        let next = current.as_ref().map_or(1, |(n, _)| n + 1);
        let dir = data_dir.join(format!("{GEN_PREFIX}{next}"));
        // A leftover of a crash before its commit: never visible, safe to discard.
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(data_err(&dir, e)),
            _ => {}
        }
        create_private_dir(&dir)?;
        let mut names = Vec::new();
        if let Some((_, cur)) = current {
            for entry in std::fs::read_dir(&cur).map_err(|e| data_err(&cur, e))? {
                let entry = entry.map_err(|e| data_err(&cur, e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                // Files are only ever replaced, never edited in place, so a hard link is a copy.
                std::fs::hard_link(entry.path(), dir.join(&name)).map_err(|e| data_err(&dir, e))?;
                names.push(name);
            }
        }
        Ok(Self {
            data_dir: data_dir.to_owned(),
            dir,
            names,
        })
    }

    pub(crate) fn write(&mut self, name: &str, contents: &[u8], mode: u32) -> Result<(), ControlError> {
        let path = self.dir.join(name);
        tapproof_tls::write_identity_file(&path, contents, mode).map_err(|e| data_err(&path, e))?;
        if !self.names.iter().any(|n| n == name) {
            self.names.push(name.to_owned());
        }
        Ok(())
    }

    pub(crate) fn write_identity(&mut self, chain_pem: &str, key_pem: &str) -> Result<(), ControlError> {
        self.write(NODE_KEY, key_pem.as_bytes(), 0o600)?;
        self.write(NODE_CERT, chain_pem.as_bytes(), 0o644)
    }

    pub(crate) fn write_bundle(&mut self, bundle: &[String]) -> Result<(), ControlError> {
        self.write(BUNDLE, bundle.concat().as_bytes(), 0o644)
    }

    pub(crate) fn write_state(&mut self, state: &ControlState) -> Result<(), ControlError> {
        let json = serde_json::to_vec_pretty(state).map_err(|e| data_err(&self.dir, e))?;
        self.write(STATE, &json, 0o600)
    }

    /// Keeps the service identities the server issued (key 0600 beside each certificate). `keys`
    /// holds (id, CSR, key) as made for the request.
    pub(crate) fn write_service_identities(
        &mut self,
        issued: &[IssuedIdentity],
        keys: &[(String, String, String)],
    ) -> Result<(), ControlError> {
        for i in issued {
            let Some((_, _, key)) = keys.iter().find(|(id, _, _)| id == &i.id) else {
                continue;
            };
            let Some(service) = i.id.rsplit_once("/svc/").map(|(_, s)| s) else {
                continue;
            };
            self.write(&format!("svc-{service}.key"), key.as_bytes(), 0o600)?;
            self.write(&format!("svc-{service}.pem"), i.chain_pem.as_bytes(), 0o644)?;
        }
        Ok(())
    }

    /// Makes the new set the current one in one rename, then removes generations older than the
    /// previous one.
    pub(crate) fn commit(self) -> Result<(), ControlError> {
        let Self { data_dir, dir, names } = self;
        sync_dir(&dir)?;
        let gen_name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = data_dir.join(format!("{CURRENT}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&gen_name, &tmp).map_err(|e| data_err(&tmp, e))?;
        std::fs::rename(&tmp, data_dir.join(CURRENT)).map_err(|e| data_err(&data_dir, e))?;
        // The names everyone opens: symlinks through `current` (made once; a rename is atomic).
        for name in &names {
            let link = data_dir.join(name);
            let want = Path::new(CURRENT).join(name);
            if std::fs::read_link(&link).is_ok_and(|t| t == want) {
                continue;
            }
            let tmp = data_dir.join(format!("{name}.link"));
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink(&want, &tmp).map_err(|e| data_err(&tmp, e))?;
            std::fs::rename(&tmp, &link).map_err(|e| data_err(&link, e))?;
        }
        sync_dir(&data_dir)?;
        let keep = generation_number(&gen_name).unwrap_or(0);
        if let Ok(entries) = std::fs::read_dir(&data_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if generation_number(&name).is_some_and(|n| n + 1 < keep) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        Ok(())
    }
}

fn generation_number(name: &str) -> Option<u64> {
    name.strip_prefix(GEN_PREFIX)?.parse().ok()
}

/// The generation `current` points at, with its path.
fn current_generation(data_dir: &Path) -> Option<(u64, PathBuf)> {
    let target = std::fs::read_link(data_dir.join(CURRENT)).ok()?;
    let n = generation_number(&target.to_string_lossy())?;
    Some((n, data_dir.join(target)))
}

/// A data dir written before identity sets (plain files, no `current`) becomes generation 0:
/// its files are linked into `gen-0/`, `current` points there, then each name is replaced by its
/// symlink (a rename; before and after it names the same bytes).
fn migrate_flat_layout(data_dir: &Path) -> Result<(), ControlError> {
    if current_generation(data_dir).is_some() {
        return Ok(());
    }
    let mut flat = Vec::new();
    for entry in std::fs::read_dir(data_dir)
        .map_err(|e| data_err(data_dir, e))?
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        let ours = [NODE_CERT, NODE_KEY, BUNDLE, STATE].contains(&name.as_str())
            || (name.starts_with("svc-") && (name.ends_with(".pem") || name.ends_with(".key")));
        if is_file && ours {
            flat.push(name);
        }
    }
    if flat.is_empty() {
        return Ok(());
    }
    let dir = data_dir.join(format!("{GEN_PREFIX}0"));
    let _ = std::fs::remove_dir_all(&dir);
    create_private_dir(&dir)?;
    for name in &flat {
        std::fs::hard_link(data_dir.join(name), dir.join(name)).map_err(|e| data_err(&dir, e))?;
    }
    Staged {
        data_dir: data_dir.to_owned(),
        dir,
        names: flat,
    }
    .commit()
}

fn create_private_dir(dir: &Path) -> Result<(), ControlError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| data_err(dir, e))
}

fn sync_dir(dir: &Path) -> Result<(), ControlError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| data_err(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(dir: &Path, name: &str) -> String {
        std::fs::read_to_string(dir.join(name)).unwrap()
    }

    #[test]
    fn a_set_becomes_visible_only_at_commit_and_as_a_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let mut s = Staged::begin(d).unwrap();
        s.write_identity("cert-1", "key-1").unwrap();
        s.write_bundle(&["b-1".into()]).unwrap();
        s.commit().unwrap();
        assert_eq!(
            (read(d, NODE_CERT), read(d, NODE_KEY), read(d, BUNDLE)),
            ("cert-1".into(), "key-1".into(), "b-1".into())
        );

        // A crash after writing the new key and before the commit: the old set is intact.
        let mut s = Staged::begin(d).unwrap();
        s.write(NODE_KEY, b"key-2", 0o600).unwrap();
        drop(s);
        assert_eq!(
            (read(d, NODE_CERT), read(d, NODE_KEY)),
            ("cert-1".into(), "key-1".into())
        );

        // The next set starts from the current one (the bundle is carried over).
        let mut s = Staged::begin(d).unwrap();
        s.write_identity("cert-3", "key-3").unwrap();
        s.commit().unwrap();
        assert_eq!(
            (read(d, NODE_CERT), read(d, NODE_KEY), read(d, BUNDLE)),
            ("cert-3".into(), "key-3".into(), "b-1".into())
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(d.join(NODE_KEY)).unwrap().permissions().mode() & 0o777,
            0o600
        );

        for _ in 0..3 {
            let mut s = Staged::begin(d).unwrap();
            s.write_bundle(&["b-n".into()]).unwrap();
            s.commit().unwrap();
        }
        let gens = std::fs::read_dir(d)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(GEN_PREFIX)
            })
            .count();
        assert_eq!(gens, 2, "the current and the previous generation are kept");
    }

    #[test]
    fn a_flat_data_dir_is_migrated_without_losing_a_file() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::write(d.join(NODE_CERT), "old-cert").unwrap();
        std::fs::write(d.join(NODE_KEY), "old-key").unwrap();
        std::fs::write(d.join("svc-db.pem"), "svc").unwrap();
        std::fs::write(d.join("unrelated.txt"), "x").unwrap();
        let mut s = Staged::begin(d).unwrap();
        s.write_bundle(&["b".into()]).unwrap();
        s.commit().unwrap();
        assert_eq!(read(d, NODE_CERT), "old-cert");
        assert_eq!(read(d, NODE_KEY), "old-key");
        assert_eq!(read(d, "svc-db.pem"), "svc");
        assert_eq!(read(d, BUNDLE), "b");
        assert!(std::fs::symlink_metadata(d.join(NODE_KEY))
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(std::fs::symlink_metadata(d.join("unrelated.txt"))
            .unwrap()
            .file_type()
            .is_file());
    }
}
