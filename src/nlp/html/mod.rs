//! HTML notes turned into the text the reference makes of them (inscriptis 2.7 over lxml's
//! libxml2 2.14 parser), so that NLP spans count the same characters: the tree is built with
//! libxml2's repairs ([`tree`]) and laid out with inscriptis's rules ([`layout`]), character
//! references decoded as both decode them ([`entities`]). Checked against the real inscriptis
//! on generated and hand-written notes by the integration tests (`tests/it/html_text.rs`).

mod entities;
mod layout;
mod tree;

/// The text of an HTML document, as `inscriptis.get_text` gives it.
pub fn html_to_text(html: &str) -> String {
    let html = crate::json::utf16::python_strip(html);
    if html.is_empty() {
        return String::new();
    }
    let html = strip_xml_declaration(html);
    // lxml refuses a document with no element; inscriptis then reads it as preformatted.
    match tree::parse(html).or_else(|| tree::parse(&format!("<pre>{html}</pre>"))) {
        Some(root) => layout::render(&root),
        None => String::new(),
    }
}

/// The document without a leading `<?xml ...?>` declaration.
fn strip_xml_declaration(html: &str) -> &str {
    if !html.starts_with("<?xml ") {
        return html;
    }
    // `<?xml ` and at least one character other than `>` before `?>`.
    match html[6..].find('>') {
        Some(gt) if gt >= 2 && html[6..6 + gt].ends_with('?') => &html[6 + gt + 1..],
        _ => html,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Any text is read without panicking: markup cut anywhere, multi-byte characters next to
    /// `<!`, `&` and `</`, deep nesting.
    #[test]
    fn any_text_converts_without_panicking() {
        const PIECES: [&str; 24] = [
            "<", ">", "/", "!", "?", "-", "&", "#", ";", "x", "é", "😀", " ", "\n", "=", "\"", "'",
            "div", "p", "td", "table", "li", "script", "amp",
        ];
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut bytes = 0;
        for _ in 0..20_000 {
            let mut text = String::new();
            for _ in 0..next() % 40 {
                text.push_str(PIECES[(next() % PIECES.len() as u64) as usize]);
            }
            bytes += text.len();
            html_to_text(&text);
        }
        assert!(bytes > 20_000 * 20, "{bytes}");
        html_to_text("<!abcdefé<!é<!doctypé<!--é<?é</é&#é&é");
    }
}
