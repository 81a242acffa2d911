//! The host state record: what tcp-dsc changed on its host, kept in a small file so that a
//! crash does not turn tcp-dsc's changes into the operator's.
//!
//! [`crate::host::setup::HostSetup`] writes the record *before* each change it makes (the VIP
//! it adds, the MAC it replaces, each sysctl with the value it found), and deletes the file
//! once everything is undone. A daemon killed with SIGKILL leaves the file behind; whoever
//! comes next reads it:
//! - a restarted daemon takes over what is still its own and still wanted
//!   ([`plan_resume`]), so it neither mistakes its predecessor's VIP for the operator's nor
//!   records the cluster MAC as the "original";
//! - `tdscd --install-member-rules` (the unit's `ExecStopPost=`) and `tdscd --remove-rules`
//!   undo it ([`plan_undo`]).
//!
//! The decisions are pure: a [`HostRecord`] and what the host shows now ([`Observed`]) go in,
//! the [`Restore`] actions (and [`Note`]s on what is left alone, and why) come out. Something
//! is put back only while the host still shows the value tcp-dsc set, so a later change by the
//! operator is never overwritten. The file lives in the runtime directory (`/run/tdsc`, a
//! tmpfs): a reboot resets the VIP, MAC and sysctls, and must forget the record with them.
//!
//! The file is JSON, written as a whole to a temporary file, synced, and renamed over the old
//! one (then the directory is synced), so a reader finds the old record or the new, never a
//! mix. A file that cannot be read as a record is never overwritten or deleted: the daemon
//! moves it aside (`<file>.corrupt`) and says so; the one-shot commands leave it in place and
//! fail.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::format_mac;

/// Where the record is kept unless `[control] host_state` says otherwise: the runtime
/// directory of tdscd.service (`RuntimeDirectory=tdsc`).
pub const DEFAULT_STATE_FILE: &str = "/run/tdsc/host.state";
/// Version of the file layout; a file of another version is refused, not guessed at.
const VERSION: u32 = 1;

/// The global sysctls tcp-dsc manages; the other is the cluster interface's `rp_filter`
/// ([`rp_filter_key`]). A record naming any other key is refused ([`is_managed`]): the record
/// decides what is written under `/proc/sys`, so it may only name what the daemon itself
/// would set.
pub const MANAGED_SYSCTLS: [&str; 2] = [
    "net/netfilter/nf_conntrack_tcp_loose",
    "net/netfilter/nf_conntrack_tcp_be_liberal",
];

/// The reverse-path filter of interface `ifname` (IPv4 only; see docs/design/control-port.md).
pub fn rp_filter_key(ifname: &str) -> String {
    format!("net/ipv4/conf/{ifname}/rp_filter")
}

/// Whether `key` is a sysctl tcp-dsc may set: one of [`MANAGED_SYSCTLS`], or the
/// `rp_filter` of a valid interface name (`all` and `default` are not interfaces it sets).
pub fn is_managed(key: &str) -> bool {
    if MANAGED_SYSCTLS.contains(&key) {
        return true;
    }
    key.strip_prefix("net/ipv4/conf/")
        .and_then(|rest| rest.strip_suffix("/rp_filter"))
        .is_some_and(|name| valid_ifname(name) && name != "all" && name != "default")
}

/// What tcp-dsc changed and has not undone yet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostRecord {
    /// The VIP, added by tcp-dsc (a VIP that was there before is not recorded).
    pub vip: Option<VipRecord>,
    /// The client interface's MAC, replaced by the cluster MAC.
    pub mac: Option<MacRecord>,
    /// Sysctls, in the order they were changed.
    pub sysctls: Vec<SysctlRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipRecord {
    pub interface: String,
    pub address: IpAddr,
    pub prefix_len: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MacRecord {
    pub interface: String,
    /// What the interface had before.
    #[serde(with = "mac_text")]
    pub original: [u8; 6],
    /// What tcp-dsc set (the cluster MAC).
    #[serde(with = "mac_text")]
    pub set: [u8; 6],
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SysctlRecord {
    /// Relative to `/proc/sys`, e.g. `net/netfilter/nf_conntrack_tcp_loose`.
    pub key: String,
    pub previous: String,
    pub set: String,
}

/// The file's layout.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnDisk {
    version: u32,
    #[serde(default)]
    vip: Option<VipRecord>,
    #[serde(default)]
    mac: Option<MacRecord>,
    #[serde(default)]
    sysctls: Vec<SysctlRecord>,
}

mod mac_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(mac: &[u8; 6], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::config::format_mac(mac))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 6], D::Error> {
        let text = String::deserialize(d)?;
        crate::config::parse_mac(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("{text:?} is not a MAC address")))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read host state file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("host state file {path} is not a tcp-dsc host record ({problem}); left as it is, so check by hand what it names")]
    Corrupt { path: PathBuf, problem: String },
    #[error("cannot write host state file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl HostRecord {
    pub fn is_empty(&self) -> bool {
        self.vip.is_none() && self.mac.is_none() && self.sysctls.is_empty()
    }

    /// The file's text.
    pub fn encode(&self) -> String {
        let disk = OnDisk {
            version: VERSION,
            vip: self.vip.clone(),
            mac: self.mac.clone(),
            sysctls: self.sysctls.clone(),
        };
        let mut text = serde_json::to_string_pretty(&disk).expect("a record always serializes");
        text.push('\n');
        text
    }

    /// Reads the file's text; the error says what is wrong with it.
    pub fn decode(text: &str) -> Result<HostRecord, String> {
        let disk: OnDisk = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if disk.version != VERSION {
            return Err(format!(
                "version {} (this tdscd reads version {VERSION})",
                disk.version
            ));
        }
        for s in &disk.sysctls {
            if !is_managed(&s.key) {
                return Err(format!("sysctl {:?} is not one tcp-dsc manages", s.key));
            }
        }
        let names = disk
            .vip
            .iter()
            .map(|v| &v.interface)
            .chain(disk.mac.iter().map(|m| &m.interface));
        for name in names {
            if !valid_ifname(name) {
                return Err(format!("{name:?} is not an interface name"));
            }
        }
        Ok(HostRecord {
            vip: disk.vip,
            mac: disk.mac,
            sysctls: disk.sysctls,
        })
    }
}

/// A Linux interface name: 1 to 15 bytes, no `/`, no whitespace, not `.` or `..`.
fn valid_ifname(name: &str) -> bool {
    (1..16).contains(&name.len())
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b.is_ascii_whitespace() || b == 0)
}

/// What the host shows now, for the interfaces and sysctls a record or a configuration
/// names. A name missing from a map is an interface that does not exist or a sysctl that
/// cannot be read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Addresses (with prefix length) on each interface.
    pub addresses: BTreeMap<String, Vec<(IpAddr, u8)>>,
    pub macs: BTreeMap<String, [u8; 6]>,
    pub sysctls: BTreeMap<String, String>,
}

impl Observed {
    /// Whether `addr` is on `interface`, with any prefix length: the kernel refuses a second
    /// copy of an IPv6 address whatever its prefix, and an IPv4 address already there makes
    /// the VIP local either way.
    pub fn has_address(&self, interface: &str, addr: IpAddr) -> bool {
        self.addresses
            .get(interface)
            .is_some_and(|a| a.iter().any(|(x, _)| *x == addr))
    }
}

/// One thing to put back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restore {
    RemoveVip(VipRecord),
    SetMac { interface: String, mac: [u8; 6] },
    WriteSysctl { key: String, value: String },
}

/// A recorded change that needs nothing, and why; logged so an operator can follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    InterfaceGone { interface: String },
    VipGone { vip: VipRecord },
    MacChangedSince { interface: String, now: [u8; 6] },
    SysctlUnreadable { key: String },
    SysctlChangedSince { key: String, now: String },
}

impl std::fmt::Display for Note {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Note::InterfaceGone { interface } => {
                write!(f, "{interface} no longer exists; nothing to put back on it")
            }
            Note::VipGone { vip } => write!(
                f,
                "{}/{} is no longer on {}; nothing to remove",
                vip.address, vip.prefix_len, vip.interface
            ),
            Note::MacChangedSince { interface, now } => write!(
                f,
                "the MAC of {interface} was changed since tcp-dsc set it (now {}); left as it is",
                format_mac(now)
            ),
            Note::SysctlUnreadable { key } => write!(f, "sysctl {key} cannot be read; left"),
            Note::SysctlChangedSince { key, now } => write!(
                f,
                "sysctl {key} was changed since tcp-dsc set it (now {now}); left as it is"
            ),
        }
    }
}

/// What to do about a record, in the order to do it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Restore>,
    pub notes: Vec<Note>,
}

/// How to undo a record: the VIP first (a node without tcp-dsc must not answer for it), then
/// the MAC, then the sysctls in reverse order of change. Each is put back only if the host
/// still shows what tcp-dsc set; a value already back needs nothing and is not noted.
pub fn plan_undo(record: &HostRecord, now: &Observed) -> Plan {
    let mut plan = Plan::default();
    if let Some(vip) = &record.vip {
        match now.addresses.get(&vip.interface) {
            None => plan.notes.push(Note::InterfaceGone {
                interface: vip.interface.clone(),
            }),
            Some(addrs) if addrs.contains(&(vip.address, vip.prefix_len)) => {
                plan.actions.push(Restore::RemoveVip(vip.clone()));
            }
            Some(_) => plan.notes.push(Note::VipGone { vip: vip.clone() }),
        }
    }
    if let Some(mac) = &record.mac {
        match now.macs.get(&mac.interface) {
            None => plan.notes.push(Note::InterfaceGone {
                interface: mac.interface.clone(),
            }),
            Some(m) if *m == mac.set => plan.actions.push(Restore::SetMac {
                interface: mac.interface.clone(),
                mac: mac.original,
            }),
            Some(m) if *m == mac.original => {}
            Some(m) => plan.notes.push(Note::MacChangedSince {
                interface: mac.interface.clone(),
                now: *m,
            }),
        }
    }
    for s in record.sysctls.iter().rev() {
        match now.sysctls.get(&s.key) {
            None => plan
                .notes
                .push(Note::SysctlUnreadable { key: s.key.clone() }),
            Some(v) if *v == s.set => plan.actions.push(Restore::WriteSysctl {
                key: s.key.clone(),
                value: s.previous.clone(),
            }),
            Some(v) if *v == s.previous => {}
            Some(v) => plan.notes.push(Note::SysctlChangedSince {
                key: s.key.clone(),
                now: v.clone(),
            }),
        }
    }
    plan
}

/// What a starting daemon wants on the host (from its configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub vip: VipRecord,
    /// Interface and cluster MAC, if the configuration sets one.
    pub mac: Option<(String, [u8; 6])>,
    /// Key and value of each managed sysctl.
    pub sysctls: Vec<(String, String)>,
}

/// A starting daemon's view of a record left by its predecessor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resume {
    /// Changes that are still in place and still wanted: they stay, and stay recorded with
    /// their original values, so this daemon undoes them at exit.
    pub keep: HostRecord,
    /// Everything else in the record: undone now, before the daemon makes its own changes.
    pub undo: Plan,
}

/// Splits a predecessor's record into what the starting daemon takes over and what it undoes
/// first. A change is taken over only if it is exactly what the configuration wants and the
/// host still shows it; a changed configuration (another VIP, interface or MAC) undoes the
/// old change, and the daemon then makes the new one as on a first start.
pub fn plan_resume(record: &HostRecord, now: &Observed, wanted: &Wanted) -> Resume {
    let mut keep = HostRecord::default();
    let mut rest = HostRecord::default();
    if let Some(vip) = &record.vip {
        let present = now
            .addresses
            .get(&vip.interface)
            .is_some_and(|a| a.contains(&(vip.address, vip.prefix_len)));
        if *vip == wanted.vip && present {
            keep.vip = Some(vip.clone());
        } else {
            rest.vip = Some(vip.clone());
        }
    }
    if let Some(mac) = &record.mac {
        let wanted_here = wanted
            .mac
            .as_ref()
            .is_some_and(|(i, m)| *i == mac.interface && *m == mac.set);
        if wanted_here && now.macs.get(&mac.interface) == Some(&mac.set) {
            keep.mac = Some(mac.clone());
        } else {
            rest.mac = Some(mac.clone());
        }
    }
    for s in &record.sysctls {
        let wanted_here = wanted
            .sysctls
            .iter()
            .any(|(k, v)| *k == s.key && *v == s.set);
        if wanted_here && now.sysctls.get(&s.key) == Some(&s.set) {
            keep.sysctls.push(s.clone());
        } else {
            rest.sysctls.push(s.clone());
        }
    }
    Resume {
        keep,
        undo: plan_undo(&rest, now),
    }
}

/// The record's file.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(path: impl Into<PathBuf>) -> StateFile {
        StateFile { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The record, or `None` when there is no file (nothing recorded).
    pub fn load(&self) -> Result<Option<HostRecord>, StateError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return Err(StateError::Corrupt {
                    path: self.path.clone(),
                    problem: "not UTF-8 text".into(),
                })
            }
            Err(source) => {
                return Err(StateError::Read {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        HostRecord::decode(&text)
            .map(Some)
            .map_err(|problem| StateError::Corrupt {
                path: self.path.clone(),
                problem,
            })
    }

    /// Replaces the file with `record` atomically (temporary file, fsync, rename, fsync of the
    /// directory); an empty record deletes the file.
    pub fn store(&self, record: &HostRecord) -> Result<(), StateError> {
        if record.is_empty() {
            return self.clear();
        }
        let err = |source| StateError::Write {
            path: self.path.clone(),
            source,
        };
        let dir = self.dir();
        std::fs::create_dir_all(&dir).map_err(err)?;
        let tmp = self.sibling(".tmp");
        let write = || -> io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            f.write_all(record.encode().as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            sync_dir(&dir)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            err(e)
        })
    }

    /// Deletes the file (nothing recorded any more).
    pub fn clear(&self) -> Result<(), StateError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => sync_dir(&self.dir()).map_err(|source| StateError::Write {
                path: self.path.clone(),
                source,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Write {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Moves an unreadable file aside (to `<file>.corrupt`, replacing an older one) so that
    /// the daemon can record afresh without destroying it; returns where it went.
    pub fn set_aside(&self) -> Result<PathBuf, StateError> {
        let to = self.sibling(".corrupt");
        std::fs::rename(&self.path, &to)
            .and_then(|()| sync_dir(&self.dir()))
            .map_err(|source| StateError::Write {
                path: self.path.clone(),
                source,
            })?;
        Ok(to)
    }

    fn dir(&self) -> PathBuf {
        match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        }
    }

    fn sibling(&self, suffix: &str) -> PathBuf {
        let mut name = self.path.file_name().unwrap_or_default().to_owned();
        name.push(suffix);
        self.path.with_file_name(name)
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOOSE: &str = MANAGED_SYSCTLS[0];
    const LIBERAL: &str = MANAGED_SYSCTLS[1];
    const ORIGINAL: [u8; 6] = [0x22, 0xac, 0xf2, 0x24, 0x38, 0x7d];
    const CLUSTER: [u8; 6] = [0x02, 0xbf, 0xc0, 0x00, 0x02, 0x01];
    const OTHER: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];

    fn vip() -> VipRecord {
        VipRecord {
            interface: "eth0".into(),
            address: "192.0.2.1".parse().unwrap(),
            prefix_len: 24,
        }
    }

    /// What a daemon records on a first start from the kernel's defaults.
    fn full_record() -> HostRecord {
        HostRecord {
            vip: Some(vip()),
            mac: Some(MacRecord {
                interface: "eth0".into(),
                original: ORIGINAL,
                set: CLUSTER,
            }),
            sysctls: vec![
                SysctlRecord {
                    key: LOOSE.into(),
                    previous: "1".into(),
                    set: "0".into(),
                },
                SysctlRecord {
                    key: LIBERAL.into(),
                    previous: "0".into(),
                    set: "1".into(),
                },
            ],
        }
    }

    /// The host as a running (or SIGKILLed) daemon leaves it.
    fn as_set(extra_addrs: &[(&str, u8)]) -> Observed {
        let mut addrs = vec![("192.0.2.1".parse().unwrap(), 24)];
        addrs.extend(extra_addrs.iter().map(|(a, p)| (a.parse().unwrap(), *p)));
        Observed {
            addresses: [("eth0".to_owned(), addrs)].into(),
            macs: [("eth0".to_owned(), CLUSTER)].into(),
            sysctls: [
                (LOOSE.to_owned(), "0".into()),
                (LIBERAL.to_owned(), "1".into()),
            ]
            .into(),
        }
    }

    fn wanted() -> Wanted {
        Wanted {
            vip: vip(),
            mac: Some(("eth0".into(), CLUSTER)),
            sysctls: vec![(LOOSE.into(), "0".into()), (LIBERAL.into(), "1".into())],
        }
    }

    #[test]
    fn only_managed_sysctls_are_accepted() {
        assert!(is_managed(LOOSE) && is_managed(LIBERAL));
        assert!(is_managed(&rp_filter_key("eth1")));
        assert!(is_managed(&rp_filter_key("eth0.100")));
        for bad in [
            "net/ipv4/conf/all/rp_filter",
            "net/ipv4/conf/default/rp_filter",
            "net/ipv4/conf/../rp_filter",
            "net/ipv4/conf/a/b/rp_filter",
            "net/ipv4/conf//rp_filter",
            "net/ipv4/conf/eth1/forwarding",
            "kernel/core_pattern",
        ] {
            assert!(!is_managed(bad), "{bad}");
        }
    }

    #[test]
    fn undo_after_a_crash_puts_back_everything_vip_first() {
        let plan = plan_undo(&full_record(), &as_set(&[]));
        assert_eq!(
            plan.actions,
            vec![
                Restore::RemoveVip(vip()),
                Restore::SetMac {
                    interface: "eth0".into(),
                    mac: ORIGINAL
                },
                Restore::WriteSysctl {
                    key: LIBERAL.into(),
                    value: "0".into()
                },
                Restore::WriteSysctl {
                    key: LOOSE.into(),
                    value: "1".into()
                },
            ]
        );
        assert!(plan.notes.is_empty(), "{:?}", plan.notes);
    }

    #[test]
    fn undo_leaves_what_the_operator_changed_since() {
        let mut now = as_set(&[]);
        now.macs.insert("eth0".into(), OTHER);
        now.sysctls.insert(LOOSE.into(), "1".into()); // back to the previous value: nothing
        now.sysctls.insert(LIBERAL.into(), "2".into()); // someone else's value: left
        now.addresses.insert("eth0".into(), vec![]);
        let plan = plan_undo(&full_record(), &now);
        assert_eq!(plan.actions, vec![]);
        assert_eq!(
            plan.notes,
            vec![
                Note::VipGone { vip: vip() },
                Note::MacChangedSince {
                    interface: "eth0".into(),
                    now: OTHER
                },
                Note::SysctlChangedSince {
                    key: LIBERAL.into(),
                    now: "2".into()
                },
            ]
        );
    }

    #[test]
    fn undo_of_a_vanished_interface_notes_it_and_removes_nothing() {
        let mut now = as_set(&[]);
        now.addresses.clear();
        now.macs.clear();
        let plan = plan_undo(&full_record(), &now);
        assert!(plan
            .actions
            .iter()
            .all(|a| matches!(a, Restore::WriteSysctl { .. })));
        assert_eq!(plan.notes.len(), 2);
    }

    #[test]
    fn a_vip_with_another_prefix_is_not_the_recorded_one() {
        // The operator's 192.0.2.1/32 beside a recorded /24 that is gone: the kernel would
        // delete only an exact match, and the /32 is not ours.
        let mut now = as_set(&[]);
        now.addresses
            .insert("eth0".into(), vec![("192.0.2.1".parse().unwrap(), 32)]);
        let plan = plan_undo(&full_record(), &now);
        assert!(!plan
            .actions
            .iter()
            .any(|a| matches!(a, Restore::RemoveVip(_))));
    }

    #[test]
    fn an_empty_record_plans_nothing() {
        assert_eq!(
            plan_undo(&HostRecord::default(), &as_set(&[])),
            Plan::default()
        );
    }

    #[test]
    fn a_restarted_daemon_takes_over_what_is_still_in_place() {
        let r = plan_resume(&full_record(), &as_set(&[]), &wanted());
        assert_eq!(
            r.keep,
            full_record(),
            "originals stay the pre-tcp-dsc values"
        );
        assert_eq!(r.undo, Plan::default(), "nothing flaps on a restart");
    }

    #[test]
    fn a_restarted_daemon_undoes_what_the_new_configuration_does_not_want() {
        let mut w = wanted();
        w.vip.address = "192.0.2.2".parse().unwrap();
        w.mac = None;
        let r = plan_resume(&full_record(), &as_set(&[]), &w);
        assert_eq!(r.keep.vip, None);
        assert_eq!(r.keep.mac, None);
        assert_eq!(r.keep.sysctls, full_record().sysctls);
        assert_eq!(
            r.undo.actions,
            vec![
                Restore::RemoveVip(vip()),
                Restore::SetMac {
                    interface: "eth0".into(),
                    mac: ORIGINAL
                },
            ]
        );
    }

    #[test]
    fn a_restarted_daemon_does_not_keep_what_is_gone_or_changed() {
        let mut now = as_set(&[]);
        now.addresses.insert("eth0".into(), vec![]);
        now.macs.insert("eth0".into(), OTHER);
        now.sysctls.insert(LOOSE.into(), "1".into());
        let r = plan_resume(&full_record(), &now, &wanted());
        assert_eq!(
            r.keep.vip, None,
            "absent: the daemon adds and records it anew"
        );
        assert_eq!(
            r.keep.mac, None,
            "changed by someone: recorded anew from now"
        );
        assert_eq!(r.keep.sysctls, vec![full_record().sysctls[1].clone()]);
        assert_eq!(
            r.undo.actions,
            vec![],
            "nothing of tcp-dsc's is left to undo"
        );
    }

    #[test]
    fn records_round_trip_through_the_file_text() {
        let r = full_record();
        let text = r.encode();
        assert!(text.contains("\"22:ac:f2:24:38:7d\""), "{text}");
        assert_eq!(HostRecord::decode(&text).unwrap(), r);
        let v6 = HostRecord {
            vip: Some(VipRecord {
                interface: "eth0".into(),
                address: "2001:db8::1".parse().unwrap(),
                prefix_len: 64,
            }),
            ..HostRecord::default()
        };
        assert_eq!(HostRecord::decode(&v6.encode()).unwrap(), v6);
    }

    #[test]
    fn corrupt_or_foreign_files_are_refused_with_the_reason() {
        let cases = [
            ("", "EOF"),
            ("{\"version\": 1, \"vip\": {\"interface\": \"eth0\"", "EOF"),
            ("{\"version\": 2}", "version 2"),
            ("{\"version\": 1, \"colour\": 3}", "unknown field"),
            (
                "{\"version\": 1, \"mac\": {\"interface\": \"eth0\", \"original\": \"zz\", \"set\": \"02:00:00:00:00:01\"}}",
                "not a MAC address",
            ),
            (
                "{\"version\": 1, \"sysctls\": [{\"key\": \"kernel/core_pattern\", \"previous\": \"x\", \"set\": \"y\"}]}",
                "not one tcp-dsc manages",
            ),
            (
                "{\"version\": 1, \"vip\": {\"interface\": \"../x\", \"address\": \"192.0.2.1\", \"prefix_len\": 24}}",
                "not an interface name",
            ),
        ];
        for (text, why) in cases {
            let e = HostRecord::decode(text).expect_err(text);
            assert!(e.contains(why), "{text:?}: {e}");
        }
    }

    #[test]
    fn the_file_is_replaced_whole_cleared_and_set_aside() {
        let dir = std::env::temp_dir().join(format!("tdsc-state-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let f = StateFile::new(dir.join("sub/host.state"));
        assert!(f.load().unwrap().is_none(), "no file: nothing recorded");
        f.store(&full_record()).unwrap();
        assert_eq!(f.load().unwrap(), Some(full_record()));
        assert!(!dir.join("sub/host.state.tmp").exists());
        f.store(&HostRecord::default()).unwrap();
        assert!(!f.path().exists(), "an empty record is no file");
        std::fs::write(f.path(), "{ torn").unwrap();
        let e = f.load().unwrap_err();
        assert!(matches!(e, StateError::Corrupt { .. }), "{e}");
        let aside = f.set_aside().unwrap();
        assert_eq!(std::fs::read_to_string(&aside).unwrap(), "{ torn");
        assert!(f.load().unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
