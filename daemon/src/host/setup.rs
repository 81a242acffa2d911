//! Host setup: the VIP, the cluster MAC and the sysctls a node needs. Everything changed is
//! remembered in [`HostSetup`], and in the host state file before it is changed
//! ([`crate::host::state`]), and put back by [`HostSetup::undo`] (or, after a crash, by the
//! next start or [`undo_recorded`]); nothing else is touched.

use std::collections::BTreeMap;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::config::{format_mac, Config};
use crate::host::netlink::{
    align4, put_attr, Netlink, AF_INET, AF_INET6, NLM_F_CREATE, NLM_F_EXCL,
};
use crate::host::state::{
    plan_resume, plan_undo, rp_filter_key, HostRecord, MacRecord, Observed, Plan, Restore,
    StateError, StateFile, SysctlRecord, VipRecord, Wanted, MANAGED_SYSCTLS,
};

const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
/// Every node holds the same address: IPv6 duplicate address detection must not run, or
/// each node would find the others and disable the VIP.
const IFA_F_NODAD: u8 = 0x02;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("interface {name} does not exist")]
    NoInterface { name: String },
    #[error("cannot add {addr} to {ifname}")]
    AddAddress {
        addr: IpAddr,
        ifname: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot set MAC {mac} on {ifname}")]
    SetMac {
        mac: String,
        ifname: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot set sysctl {path}")]
    Sysctl {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("netlink")]
    Netlink(#[source] io::Error),
    /// The kernel shows another TCP Fast Open key than the one written (the text is secret,
    /// so neither is shown).
    #[error(
        "net.ipv4.tcp_fastopen_key does not read back as written (a kernel without backup keys?)"
    )]
    FastOpenKeyReadBack,
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{} errors while undoing host setup: {}", .0.len(), .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Undo(Vec<HostError>),
}

pub fn ifindex(name: &str) -> Result<u32, HostError> {
    let c =
        std::ffi::CString::new(name).map_err(|_| HostError::NoInterface { name: name.into() })?;
    // SAFETY: c is a valid NUL-terminated string for the duration of the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(HostError::NoInterface { name: name.into() });
    }
    Ok(idx)
}

fn addr_msg(ifindex: u32, addr: &IpAddr, prefix: u8) -> Vec<u8> {
    let (family, flags, bytes) = match addr {
        IpAddr::V4(a) => (AF_INET, 0, a.octets().to_vec()),
        IpAddr::V6(a) => (AF_INET6, IFA_F_NODAD, a.octets().to_vec()),
    };
    let mut m = vec![family, prefix, flags, 0];
    m.extend_from_slice(&ifindex.to_ne_bytes());
    put_attr(&mut m, IFA_LOCAL, &bytes);
    put_attr(&mut m, IFA_ADDRESS, &bytes);
    m
}

/// Reads or writes an interface's hardware address through SIOC[GS]IFHWADDR.
// `c_char` is `i8` here: bytes are reinterpreted, never truncated.
#[allow(
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    reason = "c_char is i8: bytes are reinterpreted, never truncated"
)]
fn hwaddr(ifname: &str, set: Option<[u8; 6]>) -> io::Result<[u8; 6]> {
    // SAFETY: socket(2) with constant arguments; checked below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned here only.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    // SAFETY: ifreq is plain old data; zero is a valid initial value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(ifname.as_bytes()) {
        *d = *s as libc::c_char;
    }
    let read = |req: &mut libc::ifreq| -> io::Result<[u8; 6]> {
        // SAFETY: SIOCGIFHWADDR fills the ifreq we pass, which lives across the call.
        if unsafe { libc::ioctl(raw, libc::SIOCGIFHWADDR, req as *mut libc::ifreq) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: after SIOCGIFHWADDR the union holds ifru_hwaddr.
        let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
        let mut mac = [0u8; 6];
        for (d, s) in mac.iter_mut().zip(sa.sa_data.iter()) {
            *d = *s as u8;
        }
        Ok(mac)
    };
    let old = read(&mut req)?;
    if let Some(mac) = set {
        if mac != old {
            // SAFETY: writing the hwaddr member of the union before SIOCSIFHWADDR.
            unsafe {
                req.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
                for (d, s) in req.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(mac) {
                    *d = s as libc::c_char;
                }
            }
            // SAFETY: req is a valid ifreq for the call.
            if unsafe { libc::ioctl(raw, libc::SIOCSIFHWADDR, std::ptr::addr_of_mut!(req)) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(old)
}

/// What this daemon changed on the host, so that exit restores exactly that. The same record
/// is kept in the host state file ([`crate::host::state`]), written before each change, so
/// that a daemon that dies without undoing leaves it to the next one.
#[derive(Debug)]
pub struct HostSetup {
    file: StateFile,
    record: HostRecord,
    /// Unreadable state files found at start and moved aside (0 or 1).
    corrupt_state_files: u64,
}

/// The sysctls a node needs, and why.
fn wanted_sysctls(cfg: &Config) -> [(String, &'static str); 3] {
    [
        // A segment with no conntrack entry is another node's connection; with loose
        // pick-up off it is INVALID, and the ruleset drops it before TCP can answer with RST.
        (MANAGED_SYSCTLS[0].to_owned(), "0"),
        // Window tracking must never make us drop segments of our own connections; the
        // ruleset relies on conntrack only for "is there an entry at all".
        (MANAGED_SYSCTLS[1].to_owned(), "1"),
        // Strict reverse-path filtering on the cluster interface: an IPv4 datagram whose
        // source this host would not route back out of that interface is dropped before
        // any rule sees it. The ruleset already accepts cluster traffic only there and
        // only from members; this is the kernel's own check under it. Why strict is right
        // for the cluster network (and where it is not): docs/design/control-port.md.
        (rp_filter_key(&cfg.cluster_interface), "1"),
    ]
}

const SYSCTL_ROOT: &str = "/proc/sys";

fn wanted(cfg: &Config) -> Wanted {
    Wanted {
        vip: VipRecord {
            interface: cfg.client_interface.clone(),
            address: cfg.vip,
            prefix_len: cfg.vip_prefix_len,
        },
        mac: cfg.cluster_mac.map(|m| (cfg.client_interface.clone(), m)),
        sysctls: wanted_sysctls(cfg)
            .into_iter()
            .map(|(k, v)| (k, v.to_owned()))
            .collect(),
    }
}

fn read_sysctl(key: &str) -> Result<String, HostError> {
    let path = PathBuf::from(SYSCTL_ROOT).join(key);
    std::fs::read_to_string(&path)
        .map(|v| v.trim().to_owned())
        .map_err(|source| HostError::Sysctl { path, source })
}

fn write_sysctl(key: &str, value: &str) -> Result<(), HostError> {
    let path = PathBuf::from(SYSCTL_ROOT).join(key);
    std::fs::write(&path, value).map_err(|source| HostError::Sysctl { path, source })
}

/// The sysctl of the TCP Fast Open server key (per network namespace).
const TCP_FASTOPEN_KEY: &str = "net/ipv4/tcp_fastopen_key";

/// Sets this network namespace's TCP Fast Open server keys (`[cluster] tcp_fastopen_key =
/// "cluster"`) and checks that the kernel took them. Not recorded in the host state file and
/// not put back at exit: the key the kernel had is a secret this daemon does not store, and the
/// cluster's key staying in place keeps the clients' cookies valid across a restart.
pub fn set_tcp_fastopen_keys(keys: &tdsc_proto::seal::FastOpenKeys) -> Result<(), HostError> {
    let text = keys.sysctl_text();
    write_sysctl(TCP_FASTOPEN_KEY, &text)?;
    if read_sysctl(TCP_FASTOPEN_KEY)? != text {
        return Err(HostError::FastOpenKeyReadBack);
    }
    Ok(())
}

/// The addresses of every interface, by ifindex, from one RTM_GETADDR dump.
fn addresses_by_index() -> Result<BTreeMap<u32, Vec<(IpAddr, u8)>>, HostError> {
    let mut nl = Netlink::open(libc::NETLINK_ROUTE).map_err(HostError::Netlink)?;
    let mut by_index: BTreeMap<u32, Vec<(IpAddr, u8)>> = BTreeMap::new();
    // ifaddrmsg with family AF_UNSPEC: every family.
    nl.dump(RTM_GETADDR, &[0u8; 8], |msg| {
        if let Some((idx, addr, prefix)) = parse_addr_msg(msg) {
            by_index.entry(idx).or_default().push((addr, prefix));
        }
    })
    .map_err(HostError::Netlink)?;
    Ok(by_index)
}

/// Reads what the host shows now for these interfaces and sysctls; an interface that does
/// not exist, or a sysctl that cannot be read, is left out.
fn observe<'a>(
    interfaces: impl IntoIterator<Item = &'a str>,
    sysctls: impl IntoIterator<Item = &'a str>,
) -> Result<Observed, HostError> {
    let mut now = Observed::default();
    let by_index = addresses_by_index()?;
    for name in interfaces {
        let Ok(idx) = ifindex(name) else { continue };
        now.addresses.insert(
            name.to_owned(),
            by_index.get(&idx).cloned().unwrap_or_default(),
        );
        if let Ok(mac) = hwaddr(name, None) {
            now.macs.insert(name.to_owned(), mac);
        }
    }
    for key in sysctls {
        if let Ok(v) = read_sysctl(key) {
            now.sysctls.insert(key.to_owned(), v);
        }
    }
    Ok(now)
}

fn observe_for(record: &HostRecord, wanted: Option<&Wanted>) -> Result<Observed, HostError> {
    let mut interfaces: Vec<&str> = Vec::new();
    interfaces.extend(record.vip.iter().map(|v| v.interface.as_str()));
    interfaces.extend(record.mac.iter().map(|m| m.interface.as_str()));
    if let Some(w) = wanted {
        interfaces.push(&w.vip.interface);
    }
    observe(interfaces, record.sysctls.iter().map(|s| s.key.as_str()))
}

/// Carries out restore actions, collecting every error.
fn execute(actions: &[Restore]) -> Vec<HostError> {
    let mut errors = Vec::new();
    for a in actions {
        let r =
            match a {
                Restore::RemoveVip(v) => remove_address(&v.interface, &v.address, v.prefix_len),
                Restore::SetMac { interface, mac } => hwaddr(interface, Some(*mac))
                    .map(drop)
                    .map_err(|source| HostError::SetMac {
                        mac: format_mac(mac),
                        ifname: interface.clone(),
                        source,
                    }),
                Restore::WriteSysctl { key, value } => write_sysctl(key, value),
            };
        if let Err(e) = r {
            errors.push(e);
        }
    }
    errors
}

fn remove_address(ifname: &str, addr: &IpAddr, prefix: u8) -> Result<(), HostError> {
    let Ok(idx) = ifindex(ifname) else {
        return Ok(()); // gone with its interface
    };
    let r = Netlink::open(libc::NETLINK_ROUTE)
        .and_then(|mut nl| nl.request_ack(RTM_DELADDR, 0, &addr_msg(idx, addr, prefix)));
    match r {
        Ok(()) => Ok(()),
        Err(e)
            if e.raw_os_error() == Some(libc::EADDRNOTAVAIL)
                || e.raw_os_error() == Some(libc::ENODEV) =>
        {
            Ok(())
        }
        Err(e) => Err(HostError::Netlink(e)),
    }
}

fn log_plan(plan: &Plan, file: &StateFile) {
    for n in &plan.notes {
        tracing::info!(state = %file.path().display(), "host state: {n}");
    }
    for a in &plan.actions {
        tracing::info!(state = %file.path().display(), "host state: putting back {}", describe(a));
    }
}

fn describe(a: &Restore) -> String {
    match a {
        Restore::RemoveVip(v) => format!(
            "no VIP: removing {}/{} from {}",
            v.address, v.prefix_len, v.interface
        ),
        Restore::SetMac { interface, mac } => {
            format!("MAC {} on {interface}", format_mac(mac))
        }
        Restore::WriteSysctl { key, value } => format!("sysctl {key} = {value}"),
    }
}

/// What [`undo_recorded`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// No state file: every tdscd stopped cleanly (or none ran since boot).
    Nothing,
    /// A record was there; this many changes were put back and the file deleted.
    Undone { restored: usize },
}

/// Undoes what a tdscd that did not stop cleanly recorded in `path`, and deletes the record:
/// what `tdscd --install-member-rules` (the unit's `ExecStopPost=`) and `--remove-rules` do
/// before their rules. A corrupt file is left in place and reported.
pub fn undo_recorded(path: &Path) -> Result<Recorded, HostError> {
    let file = StateFile::new(path);
    let Some(record) = file.load()? else {
        return Ok(Recorded::Nothing);
    };
    if record.is_empty() {
        file.clear()?;
        return Ok(Recorded::Undone { restored: 0 });
    }
    let mut setup = HostSetup {
        file,
        record,
        corrupt_state_files: 0,
    };
    setup.undo().map(|restored| Recorded::Undone { restored })
}

impl HostSetup {
    /// Applies sysctls, cluster MAC and VIP, in that order, recording each change in the host
    /// state file before making it. A record left by an earlier tdscd is taken over first
    /// ([`plan_resume`]). On error, what was done so far is undone before returning.
    pub fn apply(cfg: &Config) -> Result<HostSetup, HostError> {
        let mut done = HostSetup {
            file: StateFile::new(&cfg.host_state),
            record: HostRecord::default(),
            corrupt_state_files: 0,
        };
        match done.apply_inner(cfg) {
            Ok(()) => Ok(done),
            Err(e) => {
                if let Err(u) = done.undo() {
                    tracing::warn!(error = %u, "partial host setup not fully undone");
                }
                Err(e)
            }
        }
    }

    /// Unreadable host state files this daemon found at start and moved aside.
    pub fn corrupt_state_files(&self) -> u64 {
        self.corrupt_state_files
    }

    /// Writes the record (before the change it announces).
    fn write_record(&mut self) -> Result<(), HostError> {
        Ok(self.file.store(&self.record)?)
    }

    /// Takes over (or undoes) what an earlier tdscd recorded and did not undo.
    fn resume(&mut self, wanted: &Wanted) -> Result<(), HostError> {
        let previous = match self.file.load() {
            Ok(p) => p,
            Err(e @ StateError::Corrupt { .. }) => {
                self.corrupt_state_files += 1;
                let aside = self.file.set_aside()?;
                tracing::error!(
                    error = %e,
                    moved_to = %aside.display(),
                    corrupt_state_files = self.corrupt_state_files,
                    "host state file unreadable: what an earlier tdscd changed on this host \
                     is unknown; starting afresh. Compare the moved file with the host by hand"
                );
                None
            }
            Err(e) => return Err(e.into()),
        };
        let Some(previous) = previous else {
            return Ok(());
        };
        let now = observe_for(&previous, Some(wanted))?;
        let resume = plan_resume(&previous, &now, wanted);
        tracing::info!(
            state = %self.file.path().display(),
            vip = resume.keep.vip.is_some(),
            mac = resume.keep.mac.is_some(),
            sysctls = resume.keep.sysctls.len(),
            "host state of an earlier tdscd that did not stop cleanly: taking its changes over"
        );
        log_plan(&resume.undo, &self.file);
        let errors = execute(&resume.undo.actions);
        if !errors.is_empty() {
            // The file still holds the whole record: nothing is forgotten.
            return Err(HostError::Undo(errors));
        }
        self.record = resume.keep;
        self.write_record()
    }

    fn apply_inner(&mut self, cfg: &Config) -> Result<(), HostError> {
        let wanted = wanted(cfg);
        self.resume(&wanted)?;
        for (key, value) in &wanted.sysctls {
            if self.record.sysctls.iter().any(|s| s.key == *key) {
                continue; // taken over: still set, and its previous value is recorded
            }
            let old = read_sysctl(key)?;
            if old != *value {
                self.record.sysctls.push(SysctlRecord {
                    key: key.clone(),
                    previous: old,
                    set: value.clone(),
                });
                self.write_record()?;
                write_sysctl(key, value)?;
            }
        }
        let idx = ifindex(&cfg.client_interface)?;
        ifindex(&cfg.cluster_interface)?;
        if let (Some(mac), None) = (cfg.cluster_mac, &self.record.mac) {
            let set_mac_error = |source| HostError::SetMac {
                mac: format_mac(&mac),
                ifname: cfg.client_interface.clone(),
                source,
            };
            let old = hwaddr(&cfg.client_interface, None).map_err(set_mac_error)?;
            if old != mac {
                self.record.mac = Some(MacRecord {
                    interface: cfg.client_interface.clone(),
                    original: old,
                    set: mac,
                });
                self.write_record()?;
                hwaddr(&cfg.client_interface, Some(mac)).map_err(set_mac_error)?;
            }
        }
        if self.record.vip.is_none() {
            let present = observe([cfg.client_interface.as_str()], [])?
                .has_address(&cfg.client_interface, cfg.vip);
            if present {
                tracing::info!(vip = %cfg.vip, "VIP already present on {}, configured outside tcp-dsc; leaving it in place at exit", cfg.client_interface);
                return Ok(());
            }
            self.record.vip = Some(wanted.vip.clone());
            self.write_record()?;
            match nl_add_address(idx, cfg) {
                Ok(()) => {}
                // Added by someone else since we looked: not ours to remove.
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    self.record.vip = None;
                    self.write_record()?;
                    tracing::info!(vip = %cfg.vip, "VIP already present on {}; leaving it in place at exit", cfg.client_interface);
                }
                Err(source) => {
                    return Err(HostError::AddAddress {
                        addr: cfg.vip,
                        ifname: cfg.client_interface.clone(),
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// Puts back everything recorded, VIP first, collecting errors; returns how many changes
    /// were put back. Only what the host still shows as tcp-dsc set it is touched
    /// ([`plan_undo`]). On success the state file is deleted; on error it keeps the whole
    /// record, so that `ExecStopPost=` or the next start can finish the job.
    pub fn undo(&mut self) -> Result<usize, HostError> {
        if self.record.is_empty() {
            // Nothing of ours, and the file is not ours to touch either: after a failed
            // take-over it still holds the predecessor's whole record.
            return Ok(0);
        }
        let now = observe_for(&self.record, None)?;
        let plan = plan_undo(&self.record, &now);
        log_plan(&plan, &self.file);
        let errors = execute(&plan.actions);
        if !errors.is_empty() {
            return Err(HostError::Undo(errors));
        }
        self.record = HostRecord::default();
        self.file.clear()?;
        Ok(plan.actions.len())
    }
}

fn nl_add_address(idx: u32, cfg: &Config) -> io::Result<()> {
    let mut nl = Netlink::open(libc::NETLINK_ROUTE)?;
    nl.request_ack(
        RTM_NEWADDR,
        NLM_F_CREATE | NLM_F_EXCL,
        &addr_msg(idx, &cfg.vip, cfg.vip_prefix_len),
    )
}

/// One RTM_NEWADDR message of a dump: `ifaddrmsg` (family, prefix length, flags, scope,
/// ifindex) and its attributes. The address is IFA_LOCAL when present (IPv4: IFA_ADDRESS is
/// the peer of a point-to-point link), else IFA_ADDRESS (IPv6 sends only that).
fn parse_addr_msg(msg: &[u8]) -> Option<(u32, IpAddr, u8)> {
    let family = *msg.first()?;
    let prefix = *msg.get(1)?;
    let idx = u32::from_ne_bytes(msg.get(4..8)?.try_into().ok()?);
    let mut at = 8;
    let (mut local, mut address) = (None, None);
    while at + 4 <= msg.len() {
        let len = usize::from(u16::from_ne_bytes(msg[at..at + 2].try_into().ok()?));
        let kind = u16::from_ne_bytes(msg[at + 2..at + 4].try_into().ok()?);
        if len < 4 || at + len > msg.len() {
            return None;
        }
        let payload = &msg[at + 4..at + len];
        let ip = match (family, payload.len()) {
            (AF_INET, 4) => Some(IpAddr::from(<[u8; 4]>::try_from(payload).ok()?)),
            (AF_INET6, 16) => Some(IpAddr::from(<[u8; 16]>::try_from(payload).ok()?)),
            _ => None,
        };
        match kind {
            IFA_LOCAL => local = ip,
            IFA_ADDRESS => address = ip,
            _ => {}
        }
        at += align4(len);
    }
    Some((idx, local.or(address)?, prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_message_layout() {
        let m = addr_msg(7, &"192.0.2.1".parse().unwrap(), 24);
        assert_eq!(&m[..4], &[AF_INET, 24, 0, 0]);
        assert_eq!(u32::from_ne_bytes(m[4..8].try_into().unwrap()), 7);
        assert_eq!(m.len(), 8 + 8 + 8, "two 4-byte-payload attributes");
        assert_eq!(&m[12..16], &[192, 0, 2, 1]);
        let m6 = addr_msg(7, &"2001:db8::1".parse().unwrap(), 64);
        assert_eq!(m6[2], IFA_F_NODAD, "no DAD: every node holds the address");
        assert_eq!(m6.len(), 8 + 20 + 20);
    }

    #[test]
    fn address_dump_messages_parse_local_first() {
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(parse_addr_msg(&addr_msg(7, &v4, 24)), Some((7, v4, 24)));
        // Point-to-point: IFA_ADDRESS is the peer, IFA_LOCAL ours.
        let mut ptp = vec![AF_INET, 32, 0, 0];
        ptp.extend_from_slice(&9u32.to_ne_bytes());
        put_attr(&mut ptp, IFA_ADDRESS, &[192, 0, 2, 9]);
        put_attr(&mut ptp, IFA_LOCAL, &[192, 0, 2, 1]);
        assert_eq!(parse_addr_msg(&ptp), Some((9, v4, 32)));
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        let mut m6 = vec![AF_INET6, 64, 0, 0];
        m6.extend_from_slice(&3u32.to_ne_bytes());
        put_attr(&mut m6, IFA_ADDRESS, &v6_octets(v6));
        assert_eq!(parse_addr_msg(&m6), Some((3, v6, 64)));
        let truncated = &addr_msg(7, &v4, 24)[..14];
        assert_eq!(parse_addr_msg(truncated), None);
    }

    fn v6_octets(a: IpAddr) -> [u8; 16] {
        match a {
            IpAddr::V6(a) => a.octets(),
            IpAddr::V4(_) => unreachable!(),
        }
    }
}
