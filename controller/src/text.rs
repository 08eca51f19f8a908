//! Cutting text that came from elsewhere (a node, a job, a master's
//! answer) without panicking: every cut lands on a character boundary.

/// The longest prefix of `s` of at most `max` bytes that ends on a
/// character boundary. Text from a node is cut with this, never with a
/// byte range: `&s[..64]` panics when byte 64 falls inside a character.
pub fn prefix(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    &s[..cut]
}

/// What a caught panic said (its `&str` or `String` payload), cut to a line
/// of 200 bytes, control characters replaced by `?`: a panic message can
/// quote the node's text (a slice panic quotes the string it cut).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message");
    let line = text.lines().next().unwrap_or("");
    prefix(line, 200).chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_end_on_character_boundaries() {
        // A multi-byte character across byte 64 (the attribute crash).
        let name = format!("{}é{}", "a".repeat(63), "b".repeat(10));
        assert_eq!(prefix(&name, 64), "a".repeat(63));
        assert_eq!(prefix("short", 64), "short");
        assert_eq!(prefix("€€", 4), "€");
        assert_eq!(prefix("€", 0), "");
        for max in 0..12 {
            let p = prefix("a€b😀c", max);
            assert!(p.len() <= max && "a€b😀c".starts_with(p), "{max}: {p}");
        }
    }

    #[test]
    fn a_panic_payload_is_read_as_text() {
        let p = std::panic::catch_unwind(|| panic!("boom {}", 1)).unwrap_err();
        assert_eq!(panic_message(p.as_ref()), "boom 1");
        let p = std::panic::catch_unwind(|| panic!("node said \u{1b}[2J{}", "x".repeat(300))).unwrap_err();
        let m = panic_message(p.as_ref());
        assert!(m.starts_with("node said ?[2J") && m.len() <= 200, "{m}");
        let p = std::panic::catch_unwind(|| std::panic::panic_any(7u8)).unwrap_err();
        assert_eq!(panic_message(p.as_ref()), "a panic without a message");
    }
}
