//! What a copy keeps of a source entry's `lstat`: the fields it writes or compares, in 96 bytes
//! where `std::fs::Metadata` takes 176 (a plan holds one per path: 500k of them for a large
//! context).

use std::os::unix::fs::MetadataExt;
use std::time::SystemTime;

use kiln_runtime::unixtime;
use rustix::fs::FileType;

/// A source entry's `lstat`, as a copy uses it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    /// Type and permission bits (`st_mode`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub dev: u64,
    pub ino: u64,
    pub rdev: u64,
    pub size: u64,
    /// Seconds and nanoseconds since the epoch.
    pub atime: (i64, u32),
    pub mtime: (i64, u32),
    pub ctime: (i64, u32),
}

impl From<&std::fs::Metadata> for Meta {
    fn from(m: &std::fs::Metadata) -> Meta {
        let nsec = |n: i64| u32::try_from(n).unwrap_or(0);
        Meta {
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
            nlink: u32::try_from(m.nlink()).unwrap_or(u32::MAX),
            dev: m.dev(),
            ino: m.ino(),
            rdev: m.rdev(),
            size: m.size(),
            atime: (m.atime(), nsec(m.atime_nsec())),
            mtime: (m.mtime(), nsec(m.mtime_nsec())),
            ctime: (m.ctime(), nsec(m.ctime_nsec())),
        }
    }
}

impl Meta {
    pub fn file_type(&self) -> FileType {
        FileType::from_raw_mode(self.mode)
    }

    pub fn is_dir(&self) -> bool {
        self.file_type() == FileType::Directory
    }

    pub fn is_file(&self) -> bool {
        self.file_type() == FileType::RegularFile
    }

    pub fn is_symlink(&self) -> bool {
        self.file_type() == FileType::Symlink
    }

    pub fn modified(&self) -> SystemTime {
        unixtime::join(self.mtime)
    }

    pub fn accessed(&self) -> SystemTime {
        unixtime::join(self.atime)
    }

    pub fn mtime_ns(&self) -> i64 {
        unixtime::nanos(self.mtime)
    }

    pub fn ctime_ns(&self) -> i64 {
        unixtime::nanos(self.ctime)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn meta_keeps_what_metadata_says() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"hello").unwrap();
        let past = SystemTime::UNIX_EPOCH - Duration::from_nanos(1_500_000_001);
        let file = std::fs::File::options().write(true).open(&f).unwrap();
        file.set_times(std::fs::FileTimes::new().set_modified(past).set_accessed(past))
            .unwrap();
        let md = std::fs::symlink_metadata(&f).unwrap();
        let m = Meta::from(&md);
        assert!(m.is_file() && !m.is_dir() && !m.is_symlink());
        assert_eq!((m.size, m.ino, m.nlink, m.mode), (5, md.ino(), 1, md.mode()));
        assert_eq!(m.modified(), md.modified().unwrap());
        assert_eq!(m.modified(), past);
        assert_eq!(m.accessed(), md.accessed().unwrap());
        assert_eq!(m.mtime_ns(), -1_500_000_001);
        let d = Meta::from(&std::fs::symlink_metadata(dir.path()).unwrap());
        assert!(d.is_dir());
        assert!(std::mem::size_of::<Meta>() <= 96);
    }
}
