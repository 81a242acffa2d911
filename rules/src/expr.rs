//! The nftables expressions nftnl 0.9 lacks, each a small [`Expression`] modelled on
//! `nftnl/src/expr/counter.rs`.
//!
//! Every attribute is set through libnftnl's setters (which copy their input), except the
//! compat target's info, whose buffer libnftnl 1.2.4 keeps and later frees.

use std::ffi::{c_void, CString};
use std::ptr::NonNull;

use nftnl::expr::Expression;
use nftnl::nftnl_sys as sys;
use nftnl::Rule;

use crate::ffi::{attr, c32};

/// `enum nft_hash_types`: `NFT_HASH_JENKINS` (0) is nft's `jhash`.
const NFT_HASH_JENKINS: u32 = 0;

/// nf_tables data registers as the kernel numbers them (`enum nft_registers`). The 16-byte
/// registers `NFT_REG_1..4` alias the 4-byte ones: `NFT_REG_2` is `NFT_REG32_04..07`.
pub(crate) mod reg {
    /// 16-byte register 1 (`NFT_REG32_00..03`).
    pub const R1: u32 = 1;
    /// 16-byte register 2 (`NFT_REG32_04..07`), where nft builds a hash's concatenated input.
    pub const R2: u32 = 2;
    /// 16-byte register 3, right after an IPv6 address loaded into register 2.
    pub const R3: u32 = 3;
    /// `NFT_REG32_00`, the first 4-byte register (the first quarter of register 1).
    pub const R32_00: u32 = 8;
    /// `NFT_REG32_05`, the 4-byte register right after an IPv4 address loaded into register 2.
    pub const R32_05: u32 = 13;
}

/// Allocates a libnftnl expression of type `name`.
fn alloc(name: &std::ffi::CStr) -> NonNull<sys::nftnl_expr> {
    // SAFETY: `name` is a valid NUL-terminated string; libnftnl copies nothing from it beyond
    // looking up the expression type.
    let expr = unsafe { sys::nftnl_expr_alloc(name.as_ptr()) };
    // Allocation failure is OOM (or a type libnftnl does not know, which for our constant names
    // would be a build mismatch); abort like nftnl's own `try_alloc!`.
    NonNull::new(expr).unwrap_or_else(|| std::process::abort())
}

fn set_u32(expr: NonNull<sys::nftnl_expr>, id: u32, value: u32) {
    // SAFETY: `expr` is a live expression we allocated; libnftnl validates `attr` against the
    // expression type and copies the value.
    unsafe { sys::nftnl_expr_set_u32(expr.as_ptr(), attr(id), value) };
}

fn set_u16(expr: NonNull<sys::nftnl_expr>, id: u32, value: u16) {
    // SAFETY: as in `set_u32`.
    unsafe { sys::nftnl_expr_set_u16(expr.as_ptr(), attr(id), value) };
}

/// `payload load LEN b @ BASE + OFFSET => reg DREG`. nftnl's `Payload` always loads into
/// register 1; a hash over `saddr . sport` needs the two fields side by side in other registers,
/// exactly where nft puts them, so the listing reads back as `jhash ip saddr . tcp sport`.
pub(crate) struct Load {
    pub base: PayloadBase,
    pub offset: u32,
    pub len: u32,
    pub dreg: u32,
}

/// Header a payload offset is relative to (`enum nft_payload_bases`).
#[derive(Clone, Copy)]
pub(crate) enum PayloadBase {
    Link = 0,
    Network = 1,
    Transport = 2,
}

impl Expression for Load {
    fn to_expr(&self, _rule: &Rule<'_>) -> NonNull<sys::nftnl_expr> {
        let expr = alloc(c"payload");
        set_u32(expr, sys::NFTNL_EXPR_PAYLOAD_BASE, self.base as u32);
        set_u32(expr, sys::NFTNL_EXPR_PAYLOAD_OFFSET, self.offset);
        set_u32(expr, sys::NFTNL_EXPR_PAYLOAD_LEN, self.len);
        set_u32(expr, sys::NFTNL_EXPR_PAYLOAD_DREG, self.dreg);
        expr
    }
}

/// `payload write reg SREG => LEN b @ BASE + OFFSET` with no checksum update: what nft emits
/// for `ether saddr set MAC` (an Ethernet header has no checksum).
pub(crate) struct Store {
    pub base: PayloadBase,
    pub offset: u32,
    pub len: u32,
    pub sreg: u32,
}

impl Expression for Store {
    fn to_expr(&self, _rule: &Rule<'_>) -> NonNull<sys::nftnl_expr> {
        let expr = alloc(c"payload");
        set_u32(expr, sys::NFTNL_EXPR_PAYLOAD_SREG, self.sreg);
        set_u32(expr, sys::NFTNL_EXPR_PAYLOAD_BASE, self.base as u32);
        set_u32(expr, sys::NFTNL_EXPR_PAYLOAD_OFFSET, self.offset);
        set_u32(expr, sys::NFTNL_EXPR_PAYLOAD_LEN, self.len);
        set_u32(
            expr,
            sys::NFTNL_EXPR_PAYLOAD_CSUM_TYPE,
            c32(libc::NFT_PAYLOAD_CSUM_NONE),
        );
        set_u32(expr, sys::NFTNL_EXPR_PAYLOAD_CSUM_OFFSET, 0);
        set_u32(expr, sys::NFTNL_EXPR_PAYLOAD_FLAGS, 0);
        expr
    }
}

/// `hash reg 1 = jhash(reg SREG, LEN, SEED) % mod MODULUS`.
pub(crate) struct Jhash {
    pub sreg: u32,
    pub len: u32,
    pub modulus: u32,
    pub seed: u32,
}

impl Expression for Jhash {
    fn to_expr(&self, _rule: &Rule<'_>) -> NonNull<sys::nftnl_expr> {
        let expr = alloc(c"hash");
        set_u32(expr, sys::NFTNL_EXPR_HASH_TYPE, NFT_HASH_JENKINS);
        set_u32(expr, sys::NFTNL_EXPR_HASH_SREG, self.sreg);
        set_u32(expr, sys::NFTNL_EXPR_HASH_DREG, reg::R1);
        set_u32(expr, sys::NFTNL_EXPR_HASH_LEN, self.len);
        set_u32(expr, sys::NFTNL_EXPR_HASH_MODULUS, self.modulus);
        // Always sent: without NFTA_HASH_SEED the kernel draws a random seed, and nodes would
        // disagree on which of them owns a flow.
        set_u32(expr, sys::NFTNL_EXPR_HASH_SEED, self.seed);
        expr
    }
}

/// The native `queue` expression (`nft_queue`, absent without `CONFIG_NFT_QUEUE`).
pub(crate) struct Queue {
    pub num: u16,
}

impl Expression for Queue {
    fn to_expr(&self, _rule: &Rule<'_>) -> NonNull<sys::nftnl_expr> {
        let expr = alloc(c"queue");
        set_u16(expr, sys::NFTNL_EXPR_QUEUE_NUM, self.num);
        set_u16(expr, sys::NFTNL_EXPR_QUEUE_TOTAL, 1);
        // No NFT_QUEUE_FLAG_BYPASS: fail closed (see `model::input_rules`).
        set_u16(expr, sys::NFTNL_EXPR_QUEUE_FLAGS, 0);
        expr
    }
}

/// The xtables `NFQUEUE` target, revision 3, through `nft_compat`. This is the expression
/// `iptables-nft -j NFQUEUE --queue-num N` produces.
pub(crate) struct NfqueueTarget {
    pub num: u16,
}

/// `struct xt_NFQ_info_v3` (`linux/netfilter/xt_NFQUEUE.h`), host byte order.
#[repr(C)]
struct XtNfqInfoV3 {
    queuenum: u16,
    queues_total: u16,
    flags: u16,
}

/// nft_compat checks the info length against `XT_ALIGN(sizeof(struct xt_NFQ_info_v3))`,
/// i.e. 6 rounded up to 8.
const NFQ_INFO_LEN: u32 = 8;
const NFQUEUE_REVISION: u32 = 3;

impl Expression for NfqueueTarget {
    fn to_expr(&self, _rule: &Rule<'_>) -> NonNull<sys::nftnl_expr> {
        let expr = alloc(c"target");
        // SAFETY: valid expression and NUL-terminated name; libnftnl copies the name.
        unsafe {
            sys::nftnl_expr_set_str(
                expr.as_ptr(),
                attr(sys::NFTNL_EXPR_TG_NAME),
                c"NFQUEUE".as_ptr(),
            )
        };
        set_u32(expr, sys::NFTNL_EXPR_TG_REV, NFQUEUE_REVISION);
        // SAFETY: calloc of a non-zero size; checked for NULL below. It must be malloc-family
        // memory because libnftnl 1.2.4 keeps this pointer and frees it with free().
        let info = unsafe { libc::calloc(1, NFQ_INFO_LEN as usize) }.cast::<XtNfqInfoV3>();
        if info.is_null() {
            std::process::abort();
        }
        // SAFETY: `info` points to NFQ_INFO_LEN >= size_of::<XtNfqInfoV3>() zeroed bytes, and
        // calloc's alignment suits any type.
        unsafe {
            info.write(XtNfqInfoV3 {
                queuenum: self.num,
                // At least 1: the target rejects 0.
                queues_total: 1,
                // No NFQ_FLAG_BYPASS: fail closed (see `model::input_rules`).
                flags: 0,
            })
        };
        // SAFETY: ownership of `info` passes to libnftnl, which frees it with the expression
        // (or when the attribute is set again); we never touch it afterwards.
        unsafe {
            sys::nftnl_expr_set(
                expr.as_ptr(),
                attr(sys::NFTNL_EXPR_TG_INFO),
                info.cast::<c_void>(),
                NFQ_INFO_LEN,
            )
        };
        expr
    }
}

/// `lookup reg 1 set NAME` against an anonymous set created earlier in the same batch,
/// referenced by its batch-local id. nftnl's `Lookup` cannot invert the match
/// (`NFT_LOOKUP_F_INV`, printed as `!=`).
pub(crate) struct SetLookup {
    pub set_name: CString,
    pub set_id: u32,
    pub invert: bool,
}

impl Expression for SetLookup {
    fn to_expr(&self, _rule: &Rule<'_>) -> NonNull<sys::nftnl_expr> {
        let expr = alloc(c"lookup");
        set_u32(expr, sys::NFTNL_EXPR_LOOKUP_SREG, reg::R1);
        // SAFETY: valid expression and NUL-terminated name; libnftnl copies the name.
        unsafe {
            sys::nftnl_expr_set_str(
                expr.as_ptr(),
                attr(sys::NFTNL_EXPR_LOOKUP_SET),
                self.set_name.as_ptr(),
            )
        };
        set_u32(expr, sys::NFTNL_EXPR_LOOKUP_SET_ID, self.set_id);
        // Always set, even when 0: the kernel always reports it, and `verify` compares.
        let flags = if self.invert {
            c32(libc::NFT_LOOKUP_F_INV)
        } else {
            0
        };
        set_u32(expr, sys::NFTNL_EXPR_LOOKUP_FLAGS, flags);
        expr
    }
}

/// `dynset update reg_key 1 set NAME timeout 0ms`: add the key in register 1 to a set created
/// earlier in the same batch (by its batch-local id), or restart its timeout if present. A
/// timeout of 0 means the set's own, as nft sends for `update @set { … }`; nft sends none, but
/// the kernel reports it, and [`crate::Firewall::verify`] compares what we sent with that.
///
/// With `limit`, also `expr [ limit … ]`: the kernel gives each element its own copy of the
/// limit when it adds it, and evaluates the element's copy on every update; the rule goes on
/// only if the limit matches.
pub(crate) struct DynsetUpdate {
    pub set_name: CString,
    pub set_id: u32,
    pub limit: Option<LimitOver>,
}

/// `limit rate over RATE/second burst BURST packets`: a token bucket of `burst` packets that
/// refills at `rate_per_second`; it matches a packet that finds no token (`NFT_LIMIT_F_INV`).
#[derive(Clone, Copy)]
pub(crate) struct LimitOver {
    pub rate_per_second: u32,
    pub burst: u32,
}

/// `NFTA_LIMIT_UNIT` is the period in seconds.
const LIMIT_UNIT_SECOND: u64 = 1;

impl LimitOver {
    /// A `limit` expression with every attribute the kernel reports back set, so that its
    /// rendering matches the kernel's in [`crate::Firewall::verify`].
    fn to_expr(self) -> NonNull<sys::nftnl_expr> {
        let expr = alloc(c"limit");
        // SAFETY: as in `set_u32`.
        unsafe {
            sys::nftnl_expr_set_u64(
                expr.as_ptr(),
                attr(sys::NFTNL_EXPR_LIMIT_RATE),
                u64::from(self.rate_per_second),
            );
            sys::nftnl_expr_set_u64(
                expr.as_ptr(),
                attr(sys::NFTNL_EXPR_LIMIT_UNIT),
                LIMIT_UNIT_SECOND,
            );
        }
        set_u32(expr, sys::NFTNL_EXPR_LIMIT_BURST, self.burst);
        set_u32(expr, sys::NFTNL_EXPR_LIMIT_TYPE, c32(libc::NFT_LIMIT_PKTS));
        set_u32(
            expr,
            sys::NFTNL_EXPR_LIMIT_FLAGS,
            c32(libc::NFT_LIMIT_F_INV),
        );
        expr
    }
}

impl Expression for DynsetUpdate {
    fn to_expr(&self, _rule: &Rule<'_>) -> NonNull<sys::nftnl_expr> {
        let expr = alloc(c"dynset");
        set_u32(expr, sys::NFTNL_EXPR_DYNSET_SREG_KEY, reg::R1);
        set_u32(
            expr,
            sys::NFTNL_EXPR_DYNSET_OP,
            c32(libc::NFT_DYNSET_OP_UPDATE),
        );
        // SAFETY: valid expression and NUL-terminated name; libnftnl copies the name.
        unsafe {
            sys::nftnl_expr_set_str(
                expr.as_ptr(),
                attr(sys::NFTNL_EXPR_DYNSET_SET_NAME),
                self.set_name.as_ptr(),
            )
        };
        set_u32(expr, sys::NFTNL_EXPR_DYNSET_SET_ID, self.set_id);
        // SAFETY: as in `set_u32`.
        unsafe { sys::nftnl_expr_set_u64(expr.as_ptr(), attr(sys::NFTNL_EXPR_DYNSET_TIMEOUT), 0) };
        if let Some(limit) = self.limit {
            let limit = limit.to_expr();
            // SAFETY: both are live expressions we allocated. For NFTNL_EXPR_DYNSET_EXPR,
            // libnftnl 1.2.4 takes the pointer itself as the data (not a copy of what it
            // points to) and puts the expression on the dynset's list, which frees it with the
            // dynset; the length is unused. We never touch `limit` again.
            unsafe {
                sys::nftnl_expr_set(
                    expr.as_ptr(),
                    attr(sys::NFTNL_EXPR_DYNSET_EXPR),
                    limit.as_ptr().cast::<c_void>(),
                    0,
                )
            };
        }
        expr
    }
}
