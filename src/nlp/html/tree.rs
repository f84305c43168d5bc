//! An HTML note read into the tree libxml2's HTML parser (2.14, through lxml) builds from it,
//! sloppy markup included: the reference renders that tree, so where a paragraph or a list
//! item ends (and therefore every text position after it) depends on the parser's repairs.
//!
//! What it follows, as libxml2 does for HTML 4: start tags that close the current element
//! (`<p>a<div>` closes the `p`; the pairs are derived by `tools/derive_html_rules.py` into
//! `autoclose.txt`); implied `html`, `head` and `body`; end tags that close what is open down
//! to their element unless an element of a higher rank is in between (a stray `</b>` does not
//! close a `div`), and are ignored when nothing matches; void elements; `/>` closing any
//! element; raw text in `script`, `style` and their kind; comments and `<?...>` as comments;
//! nothing after the root element is closed, or after an element nested deeper than 256.

use std::collections::HashSet;
use std::sync::OnceLock;

use super::entities::unescape;

/// A node of the tree: the reference's renderer writes an element's text and its children's
/// tails with the element's own style, and a comment's tail as it is.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    Element(Element),
    /// Text that follows the start of its element or the end of an element.
    Text(String),
    /// A comment, whose following text is its tail ([`Node::CommentTail`]).
    Comment,
    CommentTail(String),
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Element {
    /// Lowercase.
    pub name: String,
    /// Lowercase names, in document order, the first of a repeated name kept.
    pub attributes: Vec<(String, String)>,
    pub children: Vec<Node>,
}

impl Element {
    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

const AUTOCLOSE: &str = include_str!("autoclose.txt");

/// Elements with no content and no end tag.
const VOID: [&str; 13] = [
    "area", "base", "basefont", "br", "col", "frame", "hr", "img", "input", "isindex", "link",
    "meta", "param",
];

/// Elements whose content is text up to their end tag: with character references decoded
/// (`textarea`, `title`) or not; `plaintext` runs to the end of the document.
const ESCAPABLE_RAW: [&str; 2] = ["textarea", "title"];
const RAW: [&str; 6] = ["iframe", "noembed", "noframes", "script", "style", "xmp"];

/// How deep elements may nest (the root at depth 1): libxml2 stops parsing a document that
/// nests deeper (lxml does not ask for its `HUGE` option), which also bounds the layout's
/// recursion.
const MAX_DEPTH: usize = 256;

/// Elements that belong in `head` when they come before anything else.
const HEAD_CONTENT: [&str; 6] = ["script", "style", "meta", "link", "title", "base"];

fn closes(open: &str, new: &str) -> bool {
    static PAIRS: OnceLock<HashSet<(&'static str, &'static str)>> = OnceLock::new();
    PAIRS
        .get_or_init(|| {
            AUTOCLOSE
                .lines()
                .filter_map(|l| l.split_once(' '))
                .collect()
        })
        .contains(&(open, new))
}

/// How far a misplaced end tag reaches: it closes only elements of its rank or lower.
fn end_rank(name: &str) -> u32 {
    match name {
        "div" => 150,
        "td" | "th" => 160,
        "tr" => 170,
        "thead" | "tbody" | "tfoot" => 180,
        "table" => 190,
        "head" | "body" => 200,
        "html" => 220,
        _ => 100,
    }
}

/// The document's root element (`html`), or None for a document without elements or text.
pub fn parse(html: &str) -> Option<Element> {
    let html = html.replace("\r\n", "\n").replace('\r', "\n");
    let mut builder = Builder::default();
    builder.run(&html);
    builder.finish()
}

#[derive(Default)]
struct Builder {
    /// Open elements, the root first.
    open: Vec<Element>,
    root: Option<Element>,
    /// A `head` or `body` was opened (implied or not): none is implied again.
    seen_head: bool,
    seen_body: bool,
    /// Misplaced `html`, `head` and `body` start tags ignored, whose end tags are ignored too.
    ignored_starts: usize,
    /// The root element was closed: the rest of the document is not part of it.
    done: bool,
}

impl Builder {
    fn run(&mut self, html: &str) {
        let mut rest = html;
        while !rest.is_empty() && !self.done {
            let Some(lt) = rest.find('<') else {
                self.text(rest);
                return;
            };
            if lt > 0 {
                self.text(&rest[..lt]);
                if self.done {
                    return;
                }
            }
            rest = self.markup(&rest[lt..]);
        }
    }

    /// Reads the markup at the start of `s` (which starts with `<`); what follows it.
    fn markup<'a>(&mut self, s: &'a str) -> &'a str {
        let bytes = s.as_bytes();
        match bytes.get(1) {
            Some(b'/') => self.end_tag(s),
            Some(b'!') => {
                if bytes
                    .get(2..9)
                    .is_some_and(|b| b.eq_ignore_ascii_case(b"doctype"))
                {
                    after(s, ">")
                } else if s[2..].starts_with("--") {
                    self.comment();
                    comment_end(&s[4..])
                } else {
                    self.comment();
                    after(&s[2..], ">")
                }
            }
            Some(b'?') => {
                self.comment();
                after(&s[1..], ">")
            }
            Some(c) if c.is_ascii_alphabetic() => self.start_tag(s),
            _ => {
                self.text("<");
                &s[1..]
            }
        }
    }

    fn start_tag<'a>(&mut self, s: &'a str) -> &'a str {
        let (name, mut rest) = tag_name(&s[1..]);
        let mut attributes: Vec<(String, String)> = Vec::new();
        let mut self_closing = false;
        loop {
            rest = rest.trim_start_matches(is_html_space);
            if rest.is_empty() {
                // A tag cut off by the end of the document is left out.
                return rest;
            }
            if let Some(r) = rest.strip_prefix('>') {
                rest = r;
                break;
            }
            if let Some(r) = rest.strip_prefix("/>") {
                rest = r;
                self_closing = true;
                break;
            }
            if let Some(r) = rest.strip_prefix('/') {
                rest = r;
                continue;
            }
            let (attribute, r) = attribute(rest);
            rest = r;
            if !attributes.iter().any(|(n, _)| *n == attribute.0) {
                attributes.push(attribute);
            }
        }
        if self.open_element(name, attributes, self_closing) {
            return self.raw_content(rest);
        }
        rest
    }

    /// Text up to the end tag of a raw-text element that was just opened.
    fn raw_content<'a>(&mut self, s: &'a str) -> &'a str {
        let name = self.open.last().map(|e| e.name.clone()).unwrap_or_default();
        let escapable = ESCAPABLE_RAW.contains(&name.as_str());
        if name == "plaintext" {
            self.append_text(s.to_string());
            return "";
        }
        if !escapable && !RAW.contains(&name.as_str()) {
            return s;
        }
        let end = find_end_tag(s, &name).unwrap_or(s.len());
        if end > 0 {
            let text = if escapable {
                unescape(&s[..end])
            } else {
                s[..end].to_string()
            };
            self.append_text(text);
        }
        &s[end..]
    }

    /// Opens an element; whether it stays open (not void, not `/>`, not ignored).
    fn open_element(
        &mut self,
        name: String,
        attributes: Vec<(String, String)>,
        closed: bool,
    ) -> bool {
        while self.open.last().is_some_and(|e| closes(&e.name, &name)) {
            self.close_current();
        }
        self.imply(&name);
        let misplaced = (name == "html" && !self.open.is_empty())
            || (name == "head" && self.open.len() != 1)
            || (name == "body" && self.open.iter().any(|e| e.name == "body"));
        if misplaced {
            self.ignored_starts += 1;
            return false;
        }
        if self.done {
            return false;
        }
        if self.open.len() >= MAX_DEPTH {
            // libxml2 stops parsing there: the rest of the document is lost.
            self.done = true;
            return false;
        }
        match name.as_str() {
            "head" => self.seen_head = true,
            "body" => self.seen_body = true,
            _ => {}
        }
        let void = VOID.contains(&name.as_str());
        self.open.push(Element {
            name,
            attributes,
            children: Vec::new(),
        });
        if closed || void {
            self.close_current();
            return false;
        }
        true
    }

    /// Opens the `html`, `head` or `body` that `name` implies, as libxml2 does.
    fn imply(&mut self, name: &str) {
        if name == "html" {
            return;
        }
        if self.open.is_empty() {
            if self.root.is_some() {
                // A second root: libxml2 starts one, and lxml's document keeps the first.
                self.done = true;
                return;
            }
            self.push_implied("html");
        }
        if name == "body" || name == "head" {
            return;
        }
        if self.open.len() <= 1 && HEAD_CONTENT.contains(&name) {
            if !self.seen_head {
                self.seen_head = true;
                self.push_implied("head");
            }
        } else if !matches!(name, "noframes" | "frame" | "frameset") {
            let in_head_or_body = self
                .open
                .iter()
                .any(|e| e.name == "body" || e.name == "head");
            if !self.seen_body && !in_head_or_body {
                self.seen_body = true;
                self.push_implied("body");
            }
        }
    }

    fn push_implied(&mut self, name: &str) {
        self.open.push(Element {
            name: name.to_string(),
            ..Element::default()
        });
    }

    fn end_tag<'a>(&mut self, s: &'a str) -> &'a str {
        let after_slash = &s[2..];
        match after_slash.as_bytes().first() {
            None => {
                self.text("</");
                return "";
            }
            Some(b'>') => return &after_slash[1..],
            Some(c) if !c.is_ascii_alphabetic() => {
                self.comment();
                return after(after_slash, ">");
            }
            _ => {}
        }
        let (name, mut rest) = tag_name(after_slash);
        // Attributes of an end tag are read and ignored.
        loop {
            rest = rest.trim_start_matches(is_html_space);
            if let Some(r) = rest.strip_prefix('>').or_else(|| rest.strip_prefix("/>")) {
                rest = r;
                break;
            }
            if rest.is_empty() {
                return rest;
            }
            if let Some(r) = rest.strip_prefix('/') {
                rest = r;
                continue;
            }
            rest = attribute(rest).1;
        }
        self.close_element(&name);
        rest
    }

    fn close_element(&mut self, name: &str) {
        if self.ignored_starts > 0 && matches!(name, "html" | "body" | "head") {
            self.ignored_starts -= 1;
            return;
        }
        let Some(at) = self.open.iter().rposition(|e| e.name == name) else {
            return;
        };
        let rank = end_rank(name);
        if self.open[at + 1..].iter().any(|e| end_rank(&e.name) > rank) {
            return;
        }
        while self.open.len() > at {
            self.close_current();
        }
    }

    fn close_current(&mut self) {
        let Some(element) = self.open.pop() else {
            return;
        };
        match self.open.last_mut() {
            Some(parent) => parent.children.push(Node::Element(element)),
            None => {
                self.root = Some(element);
                self.done = true;
            }
        }
    }

    fn comment(&mut self) {
        if let Some(current) = self.open.last_mut() {
            current.children.push(Node::Comment);
        }
    }

    /// Character data, references decoded, where libxml2 puts it.
    fn text(&mut self, raw: &str) {
        let text = unescape(raw);
        let current = self.open.last().map(|e| e.name.clone());
        let mut rest = text.as_str();
        if matches!(current.as_deref(), None | Some("html" | "head")) {
            // Leading blanks stay where they are (nowhere, before the root); the rest of the
            // text is body content.
            let blank = rest.len() - rest.trim_start_matches(is_html_space).len();
            if blank > 0 {
                self.append_text(rest[..blank].to_string());
                rest = &rest[blank..];
            }
            if rest.is_empty() {
                return;
            }
            if current.as_deref() == Some("head") {
                while self.open.last().is_some_and(|e| closes(&e.name, "p")) {
                    self.close_current();
                }
            }
            self.imply("p");
            if self.done {
                return;
            }
        }
        self.append_text(rest.to_string());
    }

    fn append_text(&mut self, text: String) {
        let Some(current) = self.open.last_mut() else {
            return;
        };
        match current.children.last_mut() {
            Some(Node::Text(t) | Node::CommentTail(t)) => t.push_str(&text),
            Some(Node::Comment) => current.children.push(Node::CommentTail(text)),
            _ => current.children.push(Node::Text(text)),
        }
    }

    fn finish(mut self) -> Option<Element> {
        while !self.open.is_empty() {
            self.close_current();
        }
        self.root
    }
}

/// Whitespace as HTML counts it.
fn is_html_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0c' | '\r')
}

/// The lowercase tag name at the start of `s`, and what follows it.
fn tag_name(s: &str) -> (String, &str) {
    let end = s
        .find(|c: char| is_html_space(c) || c == '/' || c == '>')
        .unwrap_or(s.len());
    (s[..end].to_ascii_lowercase(), &s[end..])
}

/// An attribute at the start of `s` (name lowercased, value decoded), and what follows it.
fn attribute(s: &str) -> ((String, String), &str) {
    // The first character is part of the name even when it is `=`.
    let first = s.chars().next().map_or(0, char::len_utf8);
    let end = s[first..]
        .find(|c: char| is_html_space(c) || c == '/' || c == '>' || c == '=')
        .map_or(s.len(), |e| e + first);
    let name = s[..end].to_ascii_lowercase();
    let rest = s[end..].trim_start_matches(is_html_space);
    let Some(rest) = rest.strip_prefix('=') else {
        return ((name, String::new()), &s[end..]);
    };
    let rest = rest.trim_start_matches(is_html_space);
    let (raw, rest) = match rest.as_bytes().first() {
        Some(&q @ (b'"' | b'\'')) => {
            let body = &rest[1..];
            match body.find(q as char) {
                Some(e) => (&body[..e], &body[e + 1..]),
                None => (body, ""),
            }
        }
        _ => {
            let e = rest
                .find(|c: char| is_html_space(c) || c == '>')
                .unwrap_or(rest.len());
            (&rest[..e], &rest[e..])
        }
    };
    ((name, unescape(raw)), rest)
}

/// What follows the first `end` in `s`, or nothing.
fn after<'a>(s: &'a str, end: &str) -> &'a str {
    s.find(end).map_or("", |i| &s[i + end.len()..])
}

/// What follows a comment whose text starts `s` (after `<!--`).
fn comment_end(s: &str) -> &str {
    if let Some(r) = s.strip_prefix('>').or_else(|| s.strip_prefix("->")) {
        return r;
    }
    let close = s.find("-->").map(|i| (i, 3));
    let bang = s.find("--!>").map(|i| (i, 4));
    match [close, bang].into_iter().flatten().min() {
        Some((i, len)) => &s[i + len..],
        None => "",
    }
}

/// Where the end tag of raw-text element `name` starts in `s`.
fn find_end_tag(s: &str, name: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = s[from..].find("</") {
        let at = from + i;
        let candidate = &s[at + 2..];
        if candidate.len() >= name.len()
            && candidate.is_char_boundary(name.len())
            && candidate[..name.len()].eq_ignore_ascii_case(name)
            && candidate[name.len()..]
                .chars()
                .next()
                .is_none_or(|c| is_html_space(c) || c == '/' || c == '>')
        {
            return Some(at);
        }
        from = at + 2;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tree as lxml's `etree.tostring` would show it (text escaped only for `<`).
    fn show(e: &Element) -> String {
        let mut out = format!("<{}>", e.name);
        for child in &e.children {
            match child {
                Node::Element(c) => out.push_str(&show(c)),
                Node::Text(t) | Node::CommentTail(t) => out.push_str(t),
                Node::Comment => out.push_str("<!---->"),
            }
        }
        out.push_str(&format!("</{}>", e.name));
        out
    }

    fn tree(html: &str) -> String {
        show(&parse(html).unwrap())
    }

    #[test]
    fn repairs_as_libxml2_does() {
        assert_eq!(
            tree("Hello <b>x</b>"),
            "<html><body>Hello <b>x</b></body></html>"
        );
        assert_eq!(
            tree("<p>a<div>b</div>c</p>"),
            "<html><body><p>a</p><div>b</div>c</body></html>"
        );
        assert_eq!(tree("a</p>b"), "<html><body>ab</body></html>");
        assert_eq!(
            tree("<b>x<div>y</b>z</div>w"),
            "<html><body><b>x<div>yz</div>w</b></body></html>"
        );
        assert_eq!(
            tree("<ul><li>a<ul><li>b</ul><li>c</ul>"),
            "<html><body><ul><li>a<ul><li>b</li></ul></li><li>c</li></ul></body></html>"
        );
        assert_eq!(
            tree("<div>a</div></body></html><p>after"),
            "<html><body><div>a</div></body></html>"
        );
        assert_eq!(
            tree("<html><head><title>T&amp;</title></head><body>x</body></html>"),
            "<html><head><title>T&</title></head><body>x</body></html>"
        );
        assert_eq!(
            tree("<script>if (a<b) x</script>y<br/>z<div/>w"),
            "<html><head><script>if (a<b) x</script></head><body>y<br></br>z<div></div>w</body></html>"
        );
        // Nested deeper than 256 elements: the parse stops there.
        let deep = |n: usize| format!("{}x{}after", "<b>".repeat(n), "</b>".repeat(n));
        assert!(tree(&deep(254)).contains("x</b>") && tree(&deep(254)).contains("after"));
        assert!(!tree(&deep(255)).contains('x') && !tree(&deep(255)).contains("after"));
        assert_eq!(
            tree("a<!-- c -->b<?pi?>c"),
            "<html><body>a<!---->b<!---->c</body></html>"
        );
    }
}
