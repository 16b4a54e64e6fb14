//! The one atomic file write. Results, CSVs and state that a reader may find half written are
//! written through it: a temporary file beside the target, written and synced, renamed over the
//! target, the directory synced. On any failure (a full disk) the temporary file is removed, so
//! no partial file is left under either name.

use std::{fs, io::Write as _, path::Path};

/// Writes `bytes` to `path` atomically (see the module docs).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    let written = fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if let Some(parent) = path.parent() {
        // Make the rename itself durable.
        if let Ok(d) = fs::File::open(parent) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written whole, replacing what was there; a write that fails leaves neither the target
    /// nor a temporary file (a missing directory stands in for a full disk here; the fault test
    /// runs a real one on a full tmpfs).
    #[test]
    fn whole_or_nothing() {
        let dir = std::env::temp_dir().join(format!("awl-files-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary file left"
        );
        let missing = dir.join("no-such-dir").join("b.json");
        assert!(write_atomic(&missing, b"x").is_err());
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }
}
