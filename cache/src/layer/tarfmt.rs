//! The tar header format: encoding kiln's fixed ustar+PAX headers and decoding the fields of any
//! ustar, PAX or GNU header.

pub(crate) const BLOCK: usize = 512;

/// Name of every PAX extended header kiln writes (fixed, so tars are reproducible).
const PAX_NAME: &[u8] = b"././@PaxHeader";

/// The kinds of entries a layer tar holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Regular,
    Hardlink,
    Symlink,
    Char,
    Block,
    Dir,
    Fifo,
}

impl Kind {
    fn flag(self) -> u8 {
        match self {
            Kind::Regular => b'0',
            Kind::Hardlink => b'1',
            Kind::Symlink => b'2',
            Kind::Char => b'3',
            Kind::Block => b'4',
            Kind::Dir => b'5',
            Kind::Fifo => b'6',
        }
    }

    /// The kind for a typeflag of a real entry, or `None` for anything else.
    pub(crate) fn from_flag(flag: u8) -> Option<Kind> {
        Some(match flag {
            b'0' | 0 | b'7' => Kind::Regular,
            b'1' => Kind::Hardlink,
            b'2' => Kind::Symlink,
            b'3' => Kind::Char,
            b'4' => Kind::Block,
            b'5' => Kind::Dir,
            b'6' => Kind::Fifo,
            _ => return None,
        })
    }
}

/// Everything that goes into one entry's header(s).
pub(crate) struct Spec<'a> {
    pub path: &'a [u8],
    pub link: &'a [u8],
    pub kind: Kind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    pub mtime: i64,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub xattrs: &'a [(Vec<u8>, Vec<u8>)],
}

/// Largest value an octal field of `width` bytes holds (width-1 digits and a NUL).
fn octal_max(width: usize) -> u64 {
    (1u64 << (3 * (width as u32 - 1))) - 1
}

fn put_octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let mut v = value;
    for i in (0..digits).rev() {
        field[i] = b'0' + (v & 7) as u8;
        v >>= 3;
    }
    field[digits] = 0;
}

fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    // "LEN KEY=VALUE\n" where LEN counts itself.
    let rest = key.len() + value.len() + 3;
    let mut len = rest + 1;
    loop {
        let total = rest + len.to_string().len();
        if total == len {
            break;
        }
        len = total;
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// The numeric fields of a ustar header: uid, gid, size, mtime.
struct Numbers {
    uid: u64,
    gid: u64,
    size: u64,
    mtime: u64,
}

fn ustar_block(name: &[u8], link: &[u8], flag: u8, mode: u32, n: Numbers, dev: (u32, u32)) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    h[..name.len()].copy_from_slice(name);
    put_octal(&mut h[100..108], u64::from(mode));
    put_octal(&mut h[108..116], n.uid);
    put_octal(&mut h[116..124], n.gid);
    put_octal(&mut h[124..136], n.size);
    put_octal(&mut h[136..148], n.mtime);
    h[156] = flag;
    h[157..157 + link.len()].copy_from_slice(link);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    if matches!(flag, b'3' | b'4') {
        put_octal(&mut h[329..337], u64::from(dev.0));
        put_octal(&mut h[337..345], u64::from(dev.1));
    }
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    put_octal(&mut h[148..155], u64::from(sum));
    h[155] = b' ';
    h
}

/// Appends the header block(s) of one entry (a PAX header first when needed) to `out`.
pub(crate) fn encode(spec: &Spec<'_>, out: &mut Vec<u8>) {
    let mut records: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let name = if spec.path.len() > 100 {
        records.push((b"path".to_vec(), spec.path.to_vec()));
        &spec.path[..0]
    } else {
        spec.path
    };
    let link = if spec.link.len() > 100 {
        records.push((b"linkpath".to_vec(), spec.link.to_vec()));
        &spec.link[..0]
    } else {
        spec.link
    };
    let mut num = |key: &str, value: u64, width: usize| -> u64 {
        if value > octal_max(width) {
            records.push((key.as_bytes().to_vec(), value.to_string().into_bytes()));
            0
        } else {
            value
        }
    };
    let uid = num("uid", spec.uid, 8);
    let gid = num("gid", spec.gid, 8);
    let size = num("size", spec.size, 12);
    let mtime = if spec.mtime < 0 || spec.mtime as u64 > octal_max(12) {
        records.push((b"mtime".to_vec(), spec.mtime.to_string().into_bytes()));
        0
    } else {
        spec.mtime as u64
    };
    for (k, v) in spec.xattrs {
        let mut key = b"SCHILY.xattr.".to_vec();
        key.extend_from_slice(k);
        records.push((key, v.clone()));
    }
    if !records.is_empty() {
        records.sort();
        let mut data = Vec::new();
        for (k, v) in &records {
            pax_record(&mut data, k, v);
        }
        let block = ustar_block(
            PAX_NAME,
            b"",
            b'x',
            0o644,
            Numbers {
                uid: 0,
                gid: 0,
                size: data.len() as u64,
                mtime: 0,
            },
            (0, 0),
        );
        out.extend_from_slice(&block);
        out.extend_from_slice(&data);
        out.resize(out.len() + padding(data.len() as u64), 0);
    }
    let block = ustar_block(
        name,
        link,
        spec.kind.flag(),
        spec.mode & 0o7777,
        Numbers {
            uid,
            gid,
            size,
            mtime,
        },
        (spec.dev_major, spec.dev_minor),
    );
    out.extend_from_slice(&block);
}

/// Bytes of zero padding after `size` bytes of entry data.
pub(crate) fn padding(size: u64) -> usize {
    ((BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64) as usize
}

/// Parses a numeric header field: octal text (spaces and NULs around it allowed) or GNU base-256
/// (high bit of the first byte set). `None` when malformed.
pub(crate) fn parse_number(field: &[u8]) -> Option<i64> {
    match field.first() {
        Some(&b) if b & 0x80 != 0 => {
            if b & 0x40 != 0 {
                // Negative, two's complement over the whole field.
                let mut v: i64 = -1;
                for &byte in field {
                    v = v.wrapping_shl(8) | i64::from(byte);
                }
                Some(v)
            } else {
                let mut v = i64::from(b & 0x7f);
                for &byte in &field[1..] {
                    if v > (i64::MAX >> 8) {
                        return None;
                    }
                    v = (v << 8) | i64::from(byte);
                }
                Some(v)
            }
        }
        _ => {
            let text: &[u8] = {
                let start = field
                    .iter()
                    .position(|&c| c != b' ' && c != 0)
                    .unwrap_or(field.len());
                let rest = &field[start..];
                let end = rest
                    .iter()
                    .position(|&c| c == b' ' || c == 0)
                    .unwrap_or(rest.len());
                &rest[..end]
            };
            let mut v: i64 = 0;
            for &c in text {
                if !(b'0'..=b'7').contains(&c) {
                    return None;
                }
                v = v.checked_mul(8)?.checked_add(i64::from(c - b'0'))?;
            }
            Some(v)
        }
    }
}

/// Whether a header block's checksum is right (unsigned or the historic signed sum).
pub(crate) fn checksum_ok(h: &[u8; BLOCK]) -> bool {
    let Some(stored) = parse_number(&h[148..156]) else {
        return false;
    };
    let mut unsigned: i64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in h.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += i64::from(b);
        signed += i64::from(b as i8);
    }
    stored == unsigned || stored == signed
}

/// A C-string field: the bytes before the first NUL.
pub(crate) fn cstr(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&c| c == 0).unwrap_or(field.len());
    &field[..end]
}

/// The entry name recorded in a ustar/GNU header (POSIX prefix joined when present).
pub(crate) fn header_name(h: &[u8; BLOCK]) -> Vec<u8> {
    let name = cstr(&h[0..100]);
    if &h[257..263] == b"ustar\0" {
        let prefix = cstr(&h[345..500]);
        if !prefix.is_empty() {
            let mut full = prefix.to_vec();
            full.push(b'/');
            full.extend_from_slice(name);
            return full;
        }
    }
    name.to_vec()
}

/// One parsed PAX record.
pub(crate) struct PaxRecord<'a> {
    pub key: &'a [u8],
    pub value: &'a [u8],
}

/// Splits PAX data into records; `Err` carries a reason when malformed.
pub(crate) fn pax_records(mut data: &[u8]) -> Result<Vec<PaxRecord<'_>>, &'static str> {
    let mut out = Vec::new();
    while !data.is_empty() {
        if data.iter().all(|&b| b == 0) {
            break;
        }
        let space = data
            .iter()
            .position(|&c| c == b' ')
            .ok_or("record without a length")?;
        let len: usize = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("record length is not a number")?;
        if len <= space + 1 || len > data.len() {
            return Err("record length out of range");
        }
        let record = &data[space + 1..len];
        let Some((&b'\n', body)) = record.split_last() else {
            return Err("record does not end in a newline");
        };
        let eq = body.iter().position(|&c| c == b'=').ok_or("record without `=`")?;
        out.push(PaxRecord {
            key: &body[..eq],
            value: &body[eq + 1..],
        });
        data = &data[len..];
    }
    Ok(out)
}

/// Parses a PAX time value (`123`, `-5`, `123.456`) into seconds and nanoseconds.
pub(crate) fn parse_pax_time(value: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(value).ok()?;
    let (secs, frac) = match s.split_once('.') {
        Some((a, b)) => (a, b),
        None => (s, ""),
    };
    let secs: i64 = secs.parse().ok()?;
    if !frac.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let mut nanos: u32 = 0;
    for (i, c) in frac.bytes().take(9).enumerate() {
        nanos += u32::from(c - b'0') * 10u32.pow(8 - i as u32);
    }
    if s.starts_with('-') && nanos > 0 {
        // -1.5 means 1.5 s before the epoch (and -0.5 half a second before it).
        return Some((secs.checked_sub(1)?, 1_000_000_000 - nanos));
    }
    Some((secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_length_counts_itself() {
        let mut out = Vec::new();
        pax_record(&mut out, b"path", &[b'a'; 93]);
        assert_eq!(&out[..4], b"103 ");
        assert_eq!(out.len(), 103);
        let mut out = Vec::new();
        pax_record(&mut out, b"uid", b"1");
        assert_eq!(out, b"8 uid=1\n");
    }

    #[test]
    fn numbers_octal_and_base256() {
        assert_eq!(parse_number(b"0000644\0"), Some(0o644));
        assert_eq!(parse_number(b"  17 \0"), Some(0o17));
        assert_eq!(parse_number(b"\0\0\0\0"), Some(0));
        assert_eq!(parse_number(b"08"), None);
        assert_eq!(parse_number(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]), Some(256));
        assert_eq!(parse_number(&[0xff; 12]), Some(-1));
        assert_eq!(
            parse_number(&[0x80, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            None
        );
    }

    #[test]
    fn header_round_trip_and_checksum() {
        let mut out = Vec::new();
        let xattrs = vec![(b"user.a".to_vec(), b"v".to_vec())];
        let long = vec![b'x'; 150];
        encode(
            &Spec {
                path: &long,
                link: b"",
                kind: Kind::Regular,
                mode: 0o104755,
                uid: 3_000_000,
                gid: 7,
                size: 5,
                mtime: -3,
                dev_major: 0,
                dev_minor: 0,
                xattrs: &xattrs,
            },
            &mut out,
        );
        assert_eq!(out.len() % BLOCK, 0);
        let pax: &[u8; BLOCK] = out[..BLOCK].try_into().unwrap();
        assert!(checksum_ok(pax));
        assert_eq!(pax[156], b'x');
        let size = parse_number(&pax[124..136]).unwrap() as usize;
        let records = pax_records(&out[BLOCK..BLOCK + size]).unwrap();
        let keys: Vec<&[u8]> = records.iter().map(|r| r.key).collect();
        assert_eq!(keys, vec![&b"SCHILY.xattr.user.a"[..], b"mtime", b"path", b"uid"]);
        let main: &[u8; BLOCK] = out[out.len() - BLOCK..].try_into().unwrap();
        assert!(checksum_ok(main));
        assert_eq!(parse_number(&main[100..108]), Some(0o4755));
        assert_eq!(parse_number(&main[116..124]), Some(7));
        assert_eq!(parse_pax_time(b"-1.5"), Some((-2, 500_000_000)));
        assert_eq!(parse_pax_time(b"12.000000001"), Some((12, 1)));
        assert_eq!(parse_pax_time(b"-0.5"), Some((-1, 500_000_000)));
        assert_eq!(parse_pax_time(b"-9223372036854775808.5"), None);
    }
}
