//! A minimal nfnetlink_queue client in plain Rust: bind one queue, configure it (copy mode,
//! queue length, flags), receive packet ids, and send batch verdicts. The wire format is the
//! kernel's UAPI (`include/uapi/linux/netfilter/nfnetlink_queue.h`, `nfnetlink.h`); no C library
//! (libnetfilter_queue is GPL) is linked.
//!
//! It must not modify packets or look at payloads: the queue is configured for metadata only, and
//! the only verdict it ever sends is ACCEPT.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQNL_MSG_VERDICT_BATCH: u16 = 3;

const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_TIMESTAMP: u16 = 4;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;

const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_CFG_CMD_UNBIND: u8 = 2;
const NFQNL_COPY_META: u8 = 1;

/// Overflowing packets are accepted rather than dropped: a dropped packet stalls TCP for a
/// retransmission timeout, which would distort every figure far more than one undelayed packet.
/// Every such packet is counted as bypassed (rule counter vs packets seen).
pub(crate) const NFQA_CFG_F_FAIL_OPEN: u32 = 1;
/// Queue GSO super-packets whole instead of having the kernel segment them first: we never
/// touch payloads, so there is nothing to checksum, and bulk TCP costs one entry per super-packet.
pub(crate) const NFQA_CFG_F_GSO: u32 = 4;

const NF_ACCEPT: u32 = 1;
const NLMSG_HDRLEN: usize = 16;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// One netlink message: header, nfgenmsg (family, version, queue number), attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Msg(pub Vec<u8>);

impl Msg {
    fn new(msg_type: u16, flags: u16, seq: u32, queue: u16) -> Msg {
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in finish()
        b.extend_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | msg_type).to_ne_bytes());
        b.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills in ours
        b.push(libc::AF_UNSPEC as u8);
        b.push(0); // NFNETLINK_V0
        b.extend_from_slice(&queue.to_be_bytes());
        Msg(b)
    }

    fn attr(mut self, kind: u16, payload: &[u8]) -> Msg {
        let len = 4 + payload.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(payload);
        self.0.resize(align4(self.0.len()), 0);
        self
    }

    fn finish(mut self) -> Msg {
        let len = self.0.len() as u32;
        self.0[..4].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// Bind (or unbind) this socket to `queue`.
    pub fn cmd(seq: u32, queue: u16, bind: bool) -> Msg {
        let cmd = if bind {
            NFQNL_CFG_CMD_BIND
        } else {
            NFQNL_CFG_CMD_UNBIND
        };
        // struct nfqnl_msg_config_cmd { u8 command; u8 _pad; __be16 pf; }
        Msg::new(NFQNL_MSG_CONFIG, NLM_F_ACK, seq, queue)
            .attr(NFQA_CFG_CMD, &[cmd, 0, 0, 0])
            .finish()
    }

    /// Metadata only (no payload copy), the queue length, and `flags` (all of them masked in).
    pub(crate) fn params(seq: u32, queue: u16, maxlen: u32, flags: u32) -> Msg {
        // struct nfqnl_msg_config_params { __be32 copy_range; __u8 copy_mode; } __packed
        let mut p = 0u32.to_be_bytes().to_vec();
        p.push(NFQNL_COPY_META);
        Msg::new(NFQNL_MSG_CONFIG, NLM_F_ACK, seq, queue)
            .attr(NFQA_CFG_PARAMS, &p)
            .attr(NFQA_CFG_QUEUE_MAXLEN, &maxlen.to_be_bytes())
            .attr(NFQA_CFG_MASK, &flags.to_be_bytes())
            .attr(NFQA_CFG_FLAGS, &flags.to_be_bytes())
            .finish()
    }

    /// ACCEPT every queued packet with an id up to and including `id`.
    pub(crate) fn accept_upto(queue: u16, id: u32) -> Msg {
        // struct nfqnl_msg_verdict_hdr { __be32 verdict; __be32 id; }
        let mut v = NF_ACCEPT.to_be_bytes().to_vec();
        v.extend_from_slice(&id.to_be_bytes());
        Msg::new(NFQNL_MSG_VERDICT_BATCH, 0, 0, queue)
            .attr(NFQA_VERDICT_HDR, &v)
            .finish()
    }
}

/// What one received datagram held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// A queued packet, its id, and the kernel's time stamp of it (CLOCK_REALTIME, in µs)
    /// when the message had one: the kernel stamps a packet on arrival, or else as it queues
    /// it, once some socket has asked for receive time stamps (`line::TimeStamps`).
    Packet {
        id: u32,
        stamp_us: Option<u64>,
    },
    /// An error (negative errno) or ACK (0) for request `seq`.
    Ack {
        seq: u32,
        errno: i32,
    },
    Other,
}

/// Decodes every netlink message in `buf`, calling `f` for each.
pub fn parse(buf: &[u8], mut f: impl FnMut(Received)) {
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
        if len < NLMSG_HDRLEN {
            return;
        }
        let kind = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
        // A message cut short by a small receive buffer still yields its packet id (the packet
        // header is the kernel's first attribute): a packet whose id we lost could never be
        // released.
        let body = &buf[off + NLMSG_HDRLEN..(off + len).min(buf.len())];
        if kind == NLMSG_ERROR && body.len() >= 4 + NLMSG_HDRLEN {
            let errno = i32::from_ne_bytes(body[..4].try_into().unwrap());
            let seq = u32::from_ne_bytes(body[4 + 8..4 + 12].try_into().unwrap());
            f(Received::Ack { seq, errno });
        } else if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET && body.len() >= 4 {
            let mut a = 4; // after nfgenmsg
            let (mut id, mut stamp_us) = (None, None);
            while a + 4 <= body.len() {
                let alen = u16::from_ne_bytes(body[a..a + 2].try_into().unwrap()) as usize;
                let akind = u16::from_ne_bytes(body[a + 2..a + 4].try_into().unwrap()) & 0x3fff;
                if alen < 4 || a + alen > body.len() {
                    break;
                }
                let v = &body[a + 4..a + alen];
                if akind == NFQA_PACKET_HDR && v.len() >= 4 {
                    id = Some(u32::from_be_bytes(v[..4].try_into().unwrap()));
                } else if akind == NFQA_TIMESTAMP && v.len() >= 16 {
                    // struct nfqnl_msg_packet_timestamp: seconds and microseconds, big-endian.
                    let sec = u64::from_be_bytes(v[..8].try_into().unwrap());
                    let usec = u64::from_be_bytes(v[8..16].try_into().unwrap());
                    stamp_us = sec.checked_mul(1_000_000).and_then(|t| t.checked_add(usec));
                }
                a += align4(alen);
            }
            f(id.map_or(Received::Other, |id| Received::Packet { id, stamp_us }));
        } else {
            f(Received::Other);
        }
        off += align4(len);
    }
}

/// setsockopt(2) of a `T` on `fd`.
pub(crate) fn setsockopt<T>(
    fd: std::os::fd::RawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: &T,
) -> io::Result<()> {
    // SAFETY: v points to a T of the size passed; a bad fd is an error, not UB.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            v as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as u32,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A NETLINK_NETFILTER socket. It belongs to the network namespace of the thread that created it,
/// for its whole life, whichever thread uses it afterwards.
pub(crate) struct Socket {
    fd: OwnedFd,
}

impl Socket {
    /// Creates the socket in the calling thread's namespace, with a receive buffer of `rcvbuf`
    /// bytes (forced past `rmem_max`: we run as root) and a receive timeout so readers can stop.
    pub fn new(rcvbuf: usize, timeout_ms: u32) -> io::Result<Socket> {
        // SAFETY: plain socket(2); the fd is owned right away.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh fd that nothing else owns.
        let s = Socket {
            fd: unsafe { OwnedFd::from_raw_fd(raw) },
        };
        // SAFETY: a zeroed sockaddr_nl is a valid "kernel assigns the port id" address.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: addr is a valid sockaddr_nl of the length passed.
        let r = unsafe {
            libc::bind(
                raw,
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        s.setsockopt(
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &(rcvbuf as libc::c_int),
        )?;
        let tv = libc::timeval {
            tv_sec: (timeout_ms / 1000) as _,
            tv_usec: ((timeout_ms % 1000) * 1000) as _,
        };
        s.setsockopt(libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)?;
        Ok(s)
    }

    fn setsockopt<T>(&self, level: libc::c_int, name: libc::c_int, v: &T) -> io::Result<()> {
        setsockopt(self.fd.as_raw_fd(), level, name, v)
    }

    pub fn send(&self, m: &Msg) -> io::Result<()> {
        // SAFETY: the buffer is valid for its length; the socket is connected to the kernel by
        // default (destination port 0).
        let r = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                m.0.as_ptr() as *const libc::c_void,
                m.0.len(),
                0,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sends a request and waits for its ACK; a kernel error comes back as an io::Error.
    pub fn request(&self, m: &Msg, seq: u32) -> io::Result<()> {
        self.send(m)?;
        let mut buf = vec![0u8; 8192];
        for _ in 0..64 {
            let n = self.recv(&mut buf)?;
            let mut result = None;
            parse(&buf[..n], |r| {
                if let Received::Ack { seq: s, errno } = r {
                    if s == seq {
                        result = Some(errno);
                    }
                }
            });
            match result {
                Some(0) => return Ok(()),
                Some(e) => return Err(io::Error::from_raw_os_error(-e)),
                None => {}
            }
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "no answer from nfnetlink_queue",
        ))
    }

    pub(crate) fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is valid for writes of its length.
        let r = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }

    /// Receives up to `bufs.len()` datagrams in one call, waiting only for the first
    /// (`recvmmsg`, `MSG_WAITFORONE`). Returns each datagram's length (capped at its buffer).
    pub(crate) fn recv_many(&self, bufs: &mut [Vec<u8>], lens: &mut Vec<usize>) -> io::Result<()> {
        let mut iovs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: zeroed mmsghdr is valid; each points at one iovec that outlives the call.
        let mut hdrs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .map(|iov| {
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_iov = iov;
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        // SAFETY: hdrs/iovs/bufs are valid for the call; no timeout pointer.
        let n = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                hdrs.as_mut_ptr(),
                hdrs.len() as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        lens.clear();
        lens.extend(
            hdrs[..n as usize]
                .iter()
                .zip(bufs.iter())
                .map(|(h, b)| (h.msg_len as usize).min(b.len())),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_verdict_matches_the_uapi_layout() {
        let m = Msg::accept_upto(47001, 0x01020304);
        // nlmsghdr(16) + nfgenmsg(4) + nlattr(4) + verdict hdr(8)
        assert_eq!(m.0.len(), 32);
        assert_eq!(u32::from_ne_bytes(m.0[0..4].try_into().unwrap()), 32);
        assert_eq!(
            u16::from_ne_bytes(m.0[4..6].try_into().unwrap()),
            (3 << 8) | 3
        );
        assert_eq!(&m.0[18..20], &47001u16.to_be_bytes());
        assert_eq!(u16::from_ne_bytes(m.0[20..22].try_into().unwrap()), 12);
        assert_eq!(
            u16::from_ne_bytes(m.0[22..24].try_into().unwrap()),
            NFQA_VERDICT_HDR
        );
        assert_eq!(&m.0[24..28], &1u32.to_be_bytes()); // NF_ACCEPT
        assert_eq!(&m.0[28..32], &[1, 2, 3, 4]);
    }

    #[test]
    fn params_pad_the_five_byte_struct() {
        let m = Msg::params(7, 1, 40_000, NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO);
        // header 20, params attr 4+5 padded to 12, three u32 attrs of 8
        assert_eq!(m.0.len(), 20 + 12 + 24);
        assert_eq!(m.0[28], NFQNL_COPY_META);
        assert_eq!(&m.0[36..40], &40_000u32.to_be_bytes());
    }

    #[test]
    fn parses_a_packet_id_after_other_attributes() {
        // A packet message with an unrelated attribute before the packet header.
        let mut body = vec![0u8, 0, 0, 1]; // nfgenmsg
        body.extend_from_slice(&8u16.to_ne_bytes());
        body.extend_from_slice(&5u16.to_ne_bytes()); // NFQA_IFINDEX_INDEV
        body.extend_from_slice(&3u32.to_be_bytes());
        body.extend_from_slice(&11u16.to_ne_bytes());
        body.extend_from_slice(&NFQA_PACKET_HDR.to_ne_bytes());
        body.extend_from_slice(&[0, 0, 0, 42, 8, 0, 3, 0]); // id 42, proto, hook, pad
        let mut msg = ((16 + body.len()) as u32).to_ne_bytes().to_vec();
        msg.extend_from_slice(&((3u16 << 8) | NFQNL_MSG_PACKET).to_ne_bytes());
        msg.extend_from_slice(&[0; 10]);
        msg.extend_from_slice(&body);
        let mut two = msg.clone();
        two.extend_from_slice(&msg);
        let mut got = Vec::new();
        parse(&two, |r| got.push(r));
        let p42 = Received::Packet {
            id: 42,
            stamp_us: None,
        };
        assert_eq!(got, vec![p42, p42]);
        // A message truncated inside its packet header yields no id rather than garbage; one
        // truncated after it still yields the id.
        got.clear();
        parse(&msg[..msg.len() - 4], |r| got.push(r));
        assert_eq!(got, vec![Received::Other]);
        got.clear();
        parse(&msg[..msg.len() - 1], |r| got.push(r));
        assert_eq!(got, vec![p42]);
        // The kernel's time stamp after the packet header: 1,700,000,000 s and 123,456 µs.
        body.extend_from_slice(&20u16.to_ne_bytes());
        body.extend_from_slice(&NFQA_TIMESTAMP.to_ne_bytes());
        body.extend_from_slice(&1_700_000_000u64.to_be_bytes());
        body.extend_from_slice(&123_456u64.to_be_bytes());
        let mut msg = ((16 + body.len()) as u32).to_ne_bytes().to_vec();
        msg.extend_from_slice(&((3u16 << 8) | NFQNL_MSG_PACKET).to_ne_bytes());
        msg.extend_from_slice(&[0; 10]);
        msg.extend_from_slice(&body);
        got.clear();
        parse(&msg, |r| got.push(r));
        assert_eq!(
            got,
            vec![Received::Packet {
                id: 42,
                stamp_us: Some(1_700_000_000_123_456)
            }]
        );
    }
}
