//! Finding the workspace's binaries (`tdscd`, `tdscctl`, `tdsc-lab-httpd`).
//!
//! Order: `$TDSC_BIN_DIR` if set; else the cargo profile directory of the running executable
//! (`target/<profile>/` for both `target/<profile>/tdsc-lab` and
//! `target/<profile>/deps/<test>-<hash>`); else, for a binary missing there, the sibling
//! `release` directory.

use std::path::{Path, PathBuf};

/// Environment variable naming a directory holding every binary.
pub const BIN_DIR_ENV: &str = "TDSC_BIN_DIR";

/// Why a binary could not be found.
#[derive(Debug, thiserror::Error)]
pub enum BinError {
    #[error("cannot find the running executable")]
    CurrentExe(#[source] std::io::Error),
    #[error(
        "binary `{name}` not found in {searched}: run `cargo build --release --workspace` first \
         (or point ${BIN_DIR_ENV} at a directory holding it)"
    )]
    Missing { name: String, searched: String },
}

/// Directories searched for binaries.
#[derive(Debug, Clone)]
pub struct BinDir {
    dirs: Vec<PathBuf>,
}

impl BinDir {
    /// Locates the binary directory (see the module docs).
    pub fn locate() -> Result<Self, BinError> {
        if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
            return Ok(BinDir {
                dirs: vec![PathBuf::from(dir)],
            });
        }
        let exe = std::env::current_exe().map_err(BinError::CurrentExe)?;
        Ok(Self::from_exe(&exe))
    }

    /// The directories for a given executable path.
    pub fn from_exe(exe: &Path) -> Self {
        let mut dir = exe.parent().unwrap_or(Path::new(".")).to_owned();
        if dir.file_name().is_some_and(|n| n == "deps") {
            dir.pop();
        }
        let mut dirs = vec![dir.clone()];
        if let Some(parent) = dir.parent() {
            let release = parent.join("release");
            if release != dir {
                dirs.push(release);
            }
        }
        BinDir { dirs }
    }

    /// Full path of binary `name`.
    pub fn path(&self, name: &str) -> Result<PathBuf, BinError> {
        self.dirs
            .iter()
            .map(|d| d.join(name))
            .find(|p| p.is_file())
            .ok_or_else(|| BinError::Missing {
                name: name.to_owned(),
                searched: self
                    .dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_executables_map_to_their_profile_dir() {
        let b = BinDir::from_exe(Path::new("/w/target/debug/deps/e2e-0123"));
        assert_eq!(b.dirs[0], Path::new("/w/target/debug"));
        assert_eq!(b.dirs[1], Path::new("/w/target/release"));
        let b = BinDir::from_exe(Path::new("/w/target/release/tdsc-lab"));
        assert_eq!(b.dirs, vec![PathBuf::from("/w/target/release")]);
    }
}
