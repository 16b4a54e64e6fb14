//! A minimal reader of the kernel's BTF (`/sys/kernel/btf/vmlinux`): enough to find the byte
//! offset and size of a struct member by path, through anonymous structs and unions.
//!
//! This is how the agent avoids compiling kernel struct offsets into the eBPF object (Rust eBPF
//! cannot emit CO-RE relocations yet): offsets are looked up here at load time and written into
//! the object's read-only global `KERNEL` (`agent_common::Kernel`) before it is loaded. It only
//! reads; it never guesses a missing field.

use std::{collections::HashMap, path::Path};

use agent_common::{Offsets, SyscallNrs};

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("BTF is malformed: {0}")]
    Malformed(&'static str),
    #[error("kernel BTF has no struct {0}")]
    NoStruct(String),
    #[error("kernel BTF has no member {member} in struct {strukt}")]
    NoMember { strukt: String, member: String },
    #[error("member {0} has size {1}, expected {2}")]
    BadSize(String, u32, u32),
}

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, Clone)]
struct Member {
    name: u32,
    ty: u32,
    /// Bit offset within the parent.
    bit_offset: u32,
}

#[derive(Debug, Clone)]
struct Type {
    name: u32,
    kind: u32,
    /// Size for INT/STRUCT/UNION/ENUM, referenced type for PTR/TYPEDEF/modifiers.
    size_or_type: u32,
    members: Vec<Member>,
    /// Element type and count for arrays.
    array: Option<(u32, u32)>,
}

/// Parsed kernel BTF: types by id and the string table.
pub(crate) struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    by_name: HashMap<String, Vec<u32>>,
}

impl Btf {
    pub(crate) fn from_sys_fs() -> Result<Self, BtfError> {
        Self::from_path(Path::new("/sys/kernel/btf/vmlinux"))
    }

    pub(crate) fn from_path(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let u16_at = |o: usize| -> Result<u16, BtfError> {
            data.get(o..o + 2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .ok_or(BtfError::Malformed("truncated"))
        };
        let u32_at = |o: usize| -> Result<u32, BtfError> {
            data.get(o..o + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or(BtfError::Malformed("truncated"))
        };
        if u16_at(0)? != 0xeb9f {
            return Err(BtfError::Malformed(
                "bad magic (big-endian BTF is not supported)",
            ));
        }
        let hdr_len = u32_at(4)? as usize;
        let type_off = u32_at(8)? as usize;
        let type_len = u32_at(12)? as usize;
        let str_off = u32_at(16)? as usize;
        let str_len = u32_at(20)? as usize;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?
            .to_vec();
        let start = hdr_len + type_off;
        let end = start + type_len;
        if end > data.len() {
            return Err(BtfError::Malformed("type section out of bounds"));
        }
        // Type id 0 is void.
        let mut types = vec![Type {
            name: 0,
            kind: 0,
            size_or_type: 0,
            members: vec![],
            array: None,
        }];
        let mut o = start;
        while o < end {
            let name = u32_at(o)?;
            let info = u32_at(o + 4)?;
            let size_or_type = u32_at(o + 8)?;
            o += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut t = Type {
                name,
                kind,
                size_or_type,
                members: vec![],
                array: None,
            };
            match kind {
                KIND_INT => o += 4,
                KIND_ARRAY => {
                    t.array = Some((u32_at(o)?, u32_at(o + 8)?));
                    o += 12;
                }
                KIND_STRUCT | KIND_UNION => {
                    for _ in 0..vlen {
                        let off = u32_at(o + 8)?;
                        t.members.push(Member {
                            name: u32_at(o)?,
                            ty: u32_at(o + 4)?,
                            bit_offset: if kind_flag { off & 0xff_ffff } else { off },
                        });
                        o += 12;
                    }
                }
                KIND_ENUM => o += 8 * vlen,
                KIND_FUNC_PROTO => o += 8 * vlen,
                KIND_VAR => o += 4,
                KIND_DATASEC => o += 12 * vlen,
                KIND_DECL_TAG => o += 4,
                KIND_ENUM64 => o += 12 * vlen,
                KIND_PTR | 7 | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | 12
                | KIND_FLOAT | KIND_TYPE_TAG => {}
                _ => return Err(BtfError::Malformed("unknown type kind")),
            }
            types.push(t);
        }
        let mut btf = Btf {
            types,
            strings,
            by_name: HashMap::new(),
        };
        for id in 1..btf.types.len() as u32 {
            let t = &btf.types[id as usize];
            if (t.kind == KIND_STRUCT || t.kind == KIND_UNION) && t.name != 0 {
                let n = btf.str(t.name).to_string();
                btf.by_name.entry(n).or_default().push(id);
            }
        }
        Ok(btf)
    }

    fn str(&self, off: u32) -> &str {
        let s = &self.strings[(off as usize).min(self.strings.len())..];
        let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("")
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize).map(|t| t.kind) {
                Some(KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG) => {
                    id = self.types[id as usize].size_or_type;
                }
                _ => break,
            }
        }
        id
    }

    /// Size in bytes of a type (pointers: 8 on the 64-bit kernels we support).
    fn size_of(&self, id: u32) -> u32 {
        let id = self.resolve(id);
        let t = &self.types[id as usize];
        match t.kind {
            KIND_PTR => 8,
            KIND_ARRAY => t.array.map(|(e, n)| self.size_of(e) * n).unwrap_or(0),
            _ => t.size_or_type,
        }
    }

    /// Finds `name` among the members of `id`, descending into anonymous members.
    /// Returns (bit offset, member type).
    fn find_member(&self, id: u32, name: &str) -> Option<(u32, u32)> {
        let t = &self.types[self.resolve(id) as usize];
        for m in &t.members {
            if m.name == 0 {
                if let Some((off, ty)) = self.find_member(m.ty, name) {
                    return Some((m.bit_offset + off, ty));
                }
            } else if self.str(m.name) == name {
                return Some((m.bit_offset, m.ty));
            }
        }
        None
    }

    /// Byte offset and size of `path` ("a.b.c") inside struct `strukt`.
    pub(crate) fn member(&self, strukt: &str, path: &str) -> Result<(u32, u32), BtfError> {
        let ids = self
            .by_name
            .get(strukt)
            .ok_or_else(|| BtfError::NoStruct(strukt.into()))?;
        // Some names have several definitions (a forward-declared twin has no members); take the
        // first with the member.
        'ids: for &id in ids {
            let mut cur = id;
            let mut bits = 0u32;
            let mut ty = id;
            for part in path.split('.') {
                match self.find_member(cur, part) {
                    Some((off, t)) => {
                        bits += off;
                        ty = t;
                        cur = t;
                    }
                    None => continue 'ids,
                }
            }
            if !bits.is_multiple_of(8) {
                return Err(BtfError::Malformed("member is a bitfield"));
            }
            return Ok((bits / 8, self.size_of(ty)));
        }
        Err(BtfError::NoMember {
            strukt: strukt.into(),
            member: path.into(),
        })
    }

    fn member_sized(&self, strukt: &str, path: &str, size: u32) -> Result<u32, BtfError> {
        let (off, got) = self.member(strukt, path)?;
        if got != size {
            return Err(BtfError::BadSize(format!("{strukt}.{path}"), got, size));
        }
        Ok(off)
    }

    /// Every offset the programs need, checked for the sizes the programs read.
    pub(crate) fn offsets(&self) -> Result<Offsets, BtfError> {
        let (regs_nr, regs_arg1) = self.regs_offsets()?;
        Ok(Offsets {
            task_nsproxy: self.member_sized("task_struct", "nsproxy", 8)?,
            task_pid: self.member_sized("task_struct", "pid", 4)?,
            task_tgid: self.member_sized("task_struct", "tgid", 4)?,
            nsproxy_net_ns: self.member_sized("nsproxy", "net_ns", 8)?,
            net_inum: self.member_sized("net", "ns.inum", 4)?,
            // possible_net_t holds a single `struct net *` (or nothing without CONFIG_NET_NS).
            sk_net: self.member_sized("sock", "__sk_common.skc_net", 8)?,
            sk_num: self.member_sized("sock", "__sk_common.skc_num", 2)?,
            sk_dport: self.member_sized("sock", "__sk_common.skc_dport", 2)?,
            sk_family: self.member_sized("sock", "__sk_common.skc_family", 2)?,
            regs_nr,
            regs_arg1,
            // `unsigned int flags` in every kernel the agent supports.
            task_flags: self.member_sized("task_struct", "flags", 4)?,
        })
    }

    #[cfg(target_arch = "x86_64")]
    fn regs_offsets(&self) -> Result<(u32, u32), BtfError> {
        Ok((
            self.member_sized("pt_regs", "orig_ax", 8)?,
            self.member_sized("pt_regs", "si", 8)?,
        ))
    }

    #[cfg(target_arch = "aarch64")]
    fn regs_offsets(&self) -> Result<(u32, u32), BtfError> {
        let (regs, _) = self.member("pt_regs", "regs")?;
        Ok((self.member_sized("pt_regs", "syscallno", 4)?, regs + 8))
    }

    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    fn regs_offsets(&self) -> Result<(u32, u32), BtfError> {
        Err(BtfError::NoMember {
            strukt: "pt_regs".into(),
            member: "syscall args".into(),
        })
    }

    /// Whether the kernel has a BTF tracepoint (`btf_trace_<name>` typedef).
    pub(crate) fn has_tracepoint(&self, name: &str) -> bool {
        let want = format!("btf_trace_{name}");
        self.types
            .iter()
            .any(|t| t.kind == KIND_TYPEDEF && self.str(t.name) == want)
    }
}

/// Syscall numbers whose second argument is the user buffer (or iovec/msghdr) of socket I/O.
pub(crate) fn syscall_nrs() -> SyscallNrs {
    SyscallNrs {
        read: libc::SYS_read as u32,
        write: libc::SYS_write as u32,
        recvfrom: libc::SYS_recvfrom as u32,
        sendto: libc::SYS_sendto as u32,
        recvmsg: libc::SYS_recvmsg as u32,
        sendmsg: libc::SYS_sendmsg as u32,
        readv: libc::SYS_readv as u32,
        writev: libc::SYS_writev as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a tiny BTF blob: struct outer { u32 a; union { u16 b; u32 c; }; struct inner in; }
    fn blob() -> Vec<u8> {
        let strings = b"\0outer\0a\0b\0c\0inner\0x\0in\0u32\0u16\0".to_vec();
        let name = |s: &str| -> u32 {
            let pos = strings
                .windows(s.len() + 2)
                .position(|w| w[0] == 0 && &w[1..=s.len()] == s.as_bytes() && w[s.len() + 1] == 0);
            pos.unwrap() as u32 + 1
        };
        let mut t = Vec::new();
        let ty = |name: u32, kind: u32, vlen: u32, size: u32, t: &mut Vec<u8>| {
            t.extend_from_slice(&name.to_le_bytes());
            t.extend_from_slice(&((kind << 24) | vlen).to_le_bytes());
            t.extend_from_slice(&size.to_le_bytes());
        };
        let mem = |name: u32, ty: u32, bits: u32, t: &mut Vec<u8>| {
            t.extend_from_slice(&name.to_le_bytes());
            t.extend_from_slice(&ty.to_le_bytes());
            t.extend_from_slice(&bits.to_le_bytes());
        };
        // 1: u32
        ty(name("u32"), KIND_INT, 0, 4, &mut t);
        t.extend_from_slice(&32u32.to_le_bytes());
        // 2: u16
        ty(name("u16"), KIND_INT, 0, 2, &mut t);
        t.extend_from_slice(&16u32.to_le_bytes());
        // 3: anonymous union { u16 b; u32 c; }
        ty(0, KIND_UNION, 2, 4, &mut t);
        mem(name("b"), 2, 0, &mut t);
        mem(name("c"), 1, 0, &mut t);
        // 4: struct inner { u32 x; }
        ty(name("inner"), KIND_STRUCT, 1, 4, &mut t);
        mem(name("x"), 1, 0, &mut t);
        // 5: struct outer { u32 a; union; struct inner in; }
        ty(name("outer"), KIND_STRUCT, 3, 12, &mut t);
        mem(name("a"), 1, 0, &mut t);
        mem(0, 3, 32, &mut t);
        mem(name("in"), 4, 64, &mut t);
        let mut out = Vec::new();
        out.extend_from_slice(&0xeb9fu16.to_le_bytes());
        out.push(1);
        out.push(0);
        out.extend_from_slice(&24u32.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(t.len() as u32).to_le_bytes());
        out.extend_from_slice(&(t.len() as u32).to_le_bytes());
        out.extend_from_slice(&(strings.len() as u32).to_le_bytes());
        out.extend_from_slice(&t);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn finds_members_through_anonymous_unions_and_nested_structs() {
        let btf = Btf::parse(&blob()).unwrap();
        assert_eq!(btf.member("outer", "a").unwrap(), (0, 4));
        assert_eq!(btf.member("outer", "b").unwrap(), (4, 2));
        assert_eq!(btf.member("outer", "c").unwrap(), (4, 4));
        assert_eq!(btf.member("outer", "in.x").unwrap(), (8, 4));
        assert!(matches!(
            btf.member("outer", "zz"),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(
            btf.member("nope", "a"),
            Err(BtfError::NoStruct(_))
        ));
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(b"not btf at all, definitely not").is_err());
        assert!(Btf::parse(&[]).is_err());
    }

    /// Reads the running kernel's BTF (the agent requires it, and so do its tests): the offsets
    /// the programs need must exist.
    #[test]
    fn running_kernel_has_every_offset() {
        let btf = Btf::from_sys_fs().expect("the kernel's BTF (/sys/kernel/btf/vmlinux)");
        let o = btf.offsets().expect("offsets");
        // task_struct.pid and tgid are adjacent ints in every kernel since 2.6.
        assert_eq!(o.task_tgid, o.task_pid + 4);
        assert!(btf.has_tracepoint("sched_switch"));
    }
}
