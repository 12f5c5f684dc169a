//! Schema versions of the files the agent keeps on `/var`.
//!
//! `/var` is shared by both root slots: after an update the new slot's
//! agent reads what the old one wrote, and after a rollback the old one
//! reads what the new one wrote. Each file is a JSON object with a
//! top-level `"schema"` number ([`FIELD`]):
//!
//! - a file without one was written before schema versions (schema 0) and
//!   is read by the same rules as schema 1, whose layout it has;
//! - an older schema is brought forward by the reader's migration and
//!   written back in the current one on the next save;
//! - a newer schema than the reader knows is refused by name
//!   ([`SchemaError::Newer`]) and the file is left exactly as it is: the
//!   agent does not start rather than lose what a newer agent kept.
//!
//! Since a rollback runs the older agent on the newer agent's files, a
//! newer agent must not write a schema its predecessor cannot read until
//! its slot is promoted; every schema today is 1.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// The top-level field that carries a file's schema.
pub const FIELD: &str = "schema";

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error(
        "{path}: schema {found}, written by a newer Berth than this one (which reads up to schema {supported}): left as it is; boot the slot that wrote it, or move the file aside to start this part of the node's state over"
    )]
    Newer {
        path: PathBuf,
        found: u64,
        supported: u32,
    },
    #[error("{path}: {why}")]
    Invalid { path: PathBuf, why: String },
}

/// The schema `bytes` say they have: 0 for a JSON object without one.
/// Not a JSON object, or a schema that is not a whole number: invalid.
pub fn schema_of(bytes: &[u8], path: &Path) -> Result<u64, SchemaError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| SchemaError::Invalid {
        path: path.to_path_buf(),
        why: format!("not JSON: {e}"),
    })?;
    read_schema(&value, path)
}

fn read_schema(value: &Value, path: &Path) -> Result<u64, SchemaError> {
    let Some(object) = value.as_object() else {
        return Err(SchemaError::Invalid {
            path: path.to_path_buf(),
            why: "not a JSON object".into(),
        });
    };
    match object.get(FIELD) {
        None => Ok(0),
        Some(v) => v.as_u64().ok_or_else(|| SchemaError::Invalid {
            path: path.to_path_buf(),
            why: format!("{FIELD} {v} is not a whole number"),
        }),
    }
}

/// Whether the file at `path` (if there is one) is of a schema this Berth
/// reads. A file that cannot be read or parsed is not refused here: its
/// owner's loader says what it does with a damaged file.
pub fn check_file(path: &Path, supported: u32) -> Result<(), SchemaError> {
    let Ok(bytes) = std::fs::read(path) else {
        return Ok(());
    };
    match schema_of(&bytes, path) {
        Ok(found) if found > u64::from(supported) => Err(SchemaError::Newer {
            path: path.to_path_buf(),
            found,
            supported,
        }),
        _ => Ok(()),
    }
}

/// Reads a versioned file: refuses a newer schema than `supported`, lets
/// `migrate` bring an older one's value forward (it gets the schema found
/// and the object without its schema field), then decodes it. Returns the
/// value and the schema the file had.
pub fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    path: &Path,
    supported: u32,
    migrate: impl FnOnce(u64, &mut Value) -> Result<(), String>,
) -> Result<(T, u64), SchemaError> {
    let invalid = |why: String| SchemaError::Invalid {
        path: path.to_path_buf(),
        why,
    };
    let mut value: Value =
        serde_json::from_slice(bytes).map_err(|e| invalid(format!("not JSON: {e}")))?;
    let found = read_schema(&value, path)?;
    if found > u64::from(supported) {
        return Err(SchemaError::Newer {
            path: path.to_path_buf(),
            found,
            supported,
        });
    }
    if let Some(object) = value.as_object_mut() {
        object.remove(FIELD);
    }
    if found < u64::from(supported) {
        migrate(found, &mut value).map_err(|why| invalid(format!("schema {found}: {why}")))?;
    }
    let decoded = serde_json::from_value(value).map_err(|e| invalid(e.to_string()))?;
    Ok((decoded, found))
}

/// Writes `value` to `path` with its schema ([`encode`]) so that a crash
/// leaves the old or the new file, never a torn one: a temporary file
/// beside it, synced, renamed over, the directory synced.
pub fn save<T: Serialize>(path: &Path, value: &T, current: u32) -> std::io::Result<()> {
    let bytes = encode(value, current).map_err(std::io::Error::other)?;
    write_atomic(path, &bytes)
}

/// Writes `data` to `path` so that a crash leaves the old or the new
/// content, never a torn file.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// `value` as JSON with `"schema": current` among its top-level fields.
/// `value` must serialize to an object.
pub fn encode<T: Serialize>(value: &T, current: u32) -> serde_json::Result<Vec<u8>> {
    let mut v = serde_json::to_value(value)?;
    match v.as_object_mut() {
        Some(object) => {
            object.insert(FIELD.into(), Value::from(current));
        }
        None => {
            return Err(serde::ser::Error::custom(
                "a versioned file must be a JSON object",
            ));
        }
    }
    serde_json::to_vec_pretty(&v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Book {
        leases: Vec<String>,
    }

    fn no_migration(_: u64, _: &mut Value) -> Result<(), String> {
        Ok(())
    }

    #[test]
    fn written_with_the_schema_read_back_without_it() {
        let book = Book {
            leases: vec!["10.88.0.2".into()],
        };
        let bytes = encode(&book, 1).unwrap();
        assert_eq!(schema_of(&bytes, Path::new("b")).unwrap(), 1);
        let (back, found): (Book, u64) = decode(&bytes, Path::new("b"), 1, no_migration).unwrap();
        assert_eq!((back, found), (book, 1));
    }

    #[test]
    fn a_file_from_before_schemas_is_schema_zero_and_migrates() {
        let old = br#"{"leases": ["10.88.0.2"]}"#;
        let (book, found): (Book, u64) = decode(old, Path::new("b"), 1, no_migration).unwrap();
        assert_eq!(found, 0);
        assert_eq!(book.leases, ["10.88.0.2"]);
        // A migration that reshapes: schema 0 kept a bare list.
        let bare = br#"{"list": ["a", "b"]}"#;
        let (book, _): (Book, u64) = decode(bare, Path::new("b"), 1, |from, v| {
            assert_eq!(from, 0);
            let list = v.get("list").cloned().ok_or("no list")?;
            *v = serde_json::json!({ "leases": list });
            Ok(())
        })
        .unwrap();
        assert_eq!(book.leases, ["a", "b"]);
    }

    #[test]
    fn a_newer_schema_is_refused_by_name_and_the_file_is_untouched() {
        let dir = std::env::temp_dir().join(format!("berth-schema-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("leases.json");
        let newer = br#"{"schema": 2, "leases": [], "pools": {}}"#;
        std::fs::write(&path, newer).unwrap();
        let e = check_file(&path, 1).unwrap_err();
        let text = e.to_string();
        assert!(matches!(
            e,
            SchemaError::Newer {
                found: 2,
                supported: 1,
                ..
            }
        ));
        assert!(
            text.contains("leases.json: schema 2, written by a newer Berth"),
            "{text}"
        );
        let e = decode::<Book>(newer, &path, 1, no_migration).unwrap_err();
        assert!(matches!(e, SchemaError::Newer { .. }), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), newer);
        // Missing, damaged or current files pass the check: their loaders decide.
        assert!(check_file(&dir.join("missing.json"), 1).is_ok());
        std::fs::write(&path, b"{\"schema\": 1}").unwrap();
        assert!(check_file(&path, 1).is_ok());
        std::fs::write(&path, b"garbage").unwrap();
        assert!(check_file(&path, 1).is_ok());
        assert!(schema_of(b"[1]", &path).is_err());
        assert!(schema_of(b"{\"schema\": \"two\"}", &path).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
