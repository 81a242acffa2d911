//! The cluster key file (default [`DEFAULT_KEY_FILE`]): read, checked for its permissions,
//! parsed into a [`Keyring`]. `tdscctl keygen` writes one ([`create`]).
//!
//! The file is the cluster's only secret: whoever reads it can speak for any node. So it
//! must be a regular file that neither its group nor others can read or write (mode 0600 or
//! 0400); anything else is refused with the mode in the error, as OpenSSH does for private
//! keys.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use tdsc_proto::seal::{KeyError, Keyring};

/// Where the Debian package and the Ansible role put the key file.
pub const DEFAULT_KEY_FILE: &str = "/etc/tdsc/cluster.key";

/// Permission bits a key file must not have: any access for group or others.
const GROUP_OTHER_BITS: u32 = 0o077;

/// Why a key file was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{path}: cannot read")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a regular file")]
    NotAFile { path: PathBuf },
    #[error("{path}: mode {mode:04o} lets group or others access the cluster key (chmod 600)")]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("{path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: KeyError,
    },
    #[error("{path}: cannot create")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Reads and checks the key file at `path`.
pub fn load(path: &Path) -> Result<Keyring, KeyFileError> {
    let read = |source| KeyFileError::Read {
        path: path.to_owned(),
        source,
    };
    // Metadata of the file itself, not of a link's target: a link could point anywhere.
    let meta = std::fs::symlink_metadata(path).map_err(read)?;
    if !meta.file_type().is_file() {
        return Err(KeyFileError::NotAFile {
            path: path.to_owned(),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & GROUP_OTHER_BITS != 0 {
        return Err(KeyFileError::TooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    let text = std::fs::read_to_string(path).map_err(read)?;
    Keyring::parse(&text).map_err(|source| KeyFileError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// Writes a new key file with one fresh key (id `id`) at `path`, mode 0600. Never replaces an
/// existing file: an overwritten key would cut this node off from the cluster.
pub fn create(path: &Path, id: u8) -> Result<(), KeyFileError> {
    let create = |source| KeyFileError::Create {
        path: path.to_owned(),
        source,
    };
    let text = Keyring::generate_text(id).map_err(|source| KeyFileError::Parse {
        path: path.to_owned(),
        source,
    })?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(create)?;
    file.write_all(text.as_bytes()).map_err(create)?;
    file.sync_all().map_err(create)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tdsc-keyfile-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn created_files_load_and_are_not_overwritten() {
        let dir = temp("create");
        let path = dir.join("cluster.key");
        create(&path, 3).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        let ring = load(&path).unwrap();
        assert_eq!((ring.ids(), ring.send_id()), (vec![3], 3));
        let before = std::fs::read(&path).unwrap();
        assert!(matches!(create(&path, 3), Err(KeyFileError::Create { .. })));
        assert_eq!(std::fs::read(&path).unwrap(), before);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn open_modes_links_and_garbage_are_refused() {
        let dir = temp("refuse");
        let path = dir.join("cluster.key");
        create(&path, 1).unwrap();
        for mode in [0o640, 0o604, 0o660, 0o644, 0o602] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = load(&path).unwrap_err();
            assert!(
                matches!(err, KeyFileError::TooOpen { mode: m, .. } if m == mode),
                "{mode:o}"
            );
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(load(&path).is_ok());
        let link = dir.join("link.key");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(matches!(load(&link), Err(KeyFileError::NotAFile { .. })));
        assert!(matches!(load(&dir), Err(KeyFileError::NotAFile { .. })));
        assert!(matches!(
            load(&dir.join("absent")),
            Err(KeyFileError::Read { .. })
        ));
        let bad = dir.join("bad.key");
        std::fs::write(&bad, "key 1 nothex\n").unwrap();
        std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = load(&bad).unwrap_err();
        assert!(matches!(err, KeyFileError::Parse { .. }));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
