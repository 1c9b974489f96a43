//! JSON writing for the hot path (leaf module: no crate imports).
//!
//! Outputs are written straight into one buffer: object keys escaped once when the pipeline
//! is compiled ([`key`]), strings and numbers appended with the same text `serde_json` would
//! produce, so that a value written here reads back equal to its `serde_json::Value` form.

use serde_json::Value;

/// The object key prefix `"name":`, escaped once.
pub fn key(name: &str) -> Vec<u8> {
    let mut k = serde_json::to_vec(name).unwrap_or_default();
    k.push(b':');
    k
}

/// Appends `s` as a JSON string.
pub fn write_str(o: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        o.push(b'"');
        o.extend_from_slice(s.as_bytes());
        o.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut *o, s);
    }
}

/// Appends `x` as a JSON number (`null` when not finite).
pub fn write_f64(o: &mut Vec<u8>, x: f64) {
    let _ = serde_json::to_writer(&mut *o, &x);
}

/// `n` as a JSON value (`null` when not finite).
pub fn num(n: f64) -> Value {
    serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_text_reads_back_as_serde_json_writes_it() {
        for s in ["plain", "quote \" and \\ backslash", "tab\tnewline\n", "ünïcode ✓", ""] {
            let mut o = Vec::new();
            write_str(&mut o, s);
            assert_eq!(serde_json::from_slice::<String>(&o).unwrap(), s);
            assert_eq!(o, serde_json::to_vec(s).unwrap());
        }
        for x in [0.0, -1.5, 1e300, 0.1 + 0.2, f64::NAN, f64::INFINITY] {
            let mut o = Vec::new();
            write_f64(&mut o, x);
            assert_eq!(serde_json::from_slice::<Value>(&o).unwrap(), num(x), "{x}");
        }
        assert_eq!(key("a\"b"), b"\"a\\\"b\":".to_vec());
    }
}
