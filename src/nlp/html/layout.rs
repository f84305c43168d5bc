//! An HTML tree laid out as text the way inscriptis (2.7, its default "relaxed" profile) lays
//! it out: blocks on their own lines with their vertical margins as blank lines, `div`s and
//! lists indented, list items bulleted or numbered, tables drawn as aligned columns, and the
//! inline text of each line with its whitespace collapsed. Text positions in the result are
//! what NLP spans are counted in, so the rules are followed to the character, quirks included
//! (a style's whitespace is not inherited, so a `span` inside `pre` collapses its spaces; text
//! is unescaped once more as it is written).

use super::entities::unescape;
use super::tree::{Element, Node};
use crate::json::utf16::is_python_space;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Display {
    Inline,
    Block,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WhiteSpace {
    Normal,
    Pre,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Align {
    Left,
    Right,
    Center,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VAlign {
    Top,
    Middle,
    Bottom,
}

/// Which canvas an element writes to: the document's (or a table's, for text between cells),
/// or a table cell's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CanvasId(usize);

/// How an element is rendered: its profile entry, refined by its attributes and its parent.
#[derive(Debug, Clone)]
struct Style {
    display: Display,
    whitespace: WhiteSpace,
    margin_before: i64,
    margin_after: i64,
    padding: i64,
    prefix: &'static str,
    suffix: &'static str,
    limit_whitespace_affixes: bool,
    list_bullet: String,
    align: Align,
    valign: VAlign,
    previous_margin_after: i64,
    canvas: CanvasId,
}

impl Style {
    fn inline() -> Style {
        Style {
            display: Display::Inline,
            whitespace: WhiteSpace::Normal,
            margin_before: 0,
            margin_after: 0,
            padding: 0,
            prefix: "",
            suffix: "",
            limit_whitespace_affixes: false,
            list_bullet: String::new(),
            align: Align::Left,
            valign: VAlign::Middle,
            previous_margin_after: 0,
            canvas: CanvasId(0),
        }
    }

    /// The profile's style of an element named `name`.
    fn of(name: &str) -> Style {
        let mut style = Style::inline();
        let block = |margins: i64, padding: i64| Style {
            display: Display::Block,
            margin_before: margins,
            margin_after: margins,
            padding,
            ..Style::inline()
        };
        match name {
            "head" | "link" | "meta" | "script" | "title" | "style" => {
                style.display = Display::None
            }
            "p" | "figure" | "h1" | "h2" | "h3" | "h4" | "h5" | "h6" => style = block(1, 0),
            "ul" | "ol" => style = block(0, 4),
            "div" => style = block(0, 2),
            "li" | "address" | "article" | "aside" | "footer" | "header" | "hgroup" | "layer"
            | "main" | "nav" | "figcaption" | "blockquote" => style = block(0, 0),
            "q" => {
                style.prefix = "\"";
                style.suffix = "\"";
            }
            "span" => {
                style.prefix = " ";
                style.suffix = " ";
                style.limit_whitespace_affixes = true;
            }
            "pre" | "xmp" | "listing" | "plaintext" => {
                style = block(0, 0);
                style.whitespace = WhiteSpace::Pre;
            }
            _ => {}
        }
        style
    }

    /// Applies the `style`, `align` and `valign` attributes, in document order.
    fn apply_attributes(&mut self, element: &Element) {
        for (name, value) in &element.attributes {
            match name.as_str() {
                "style" => self.apply_css(value),
                "align" => {
                    if let Some(a) = align(value) {
                        self.align = a;
                    }
                }
                "valign" => {
                    if let Some(v) = valign(value) {
                        self.valign = v;
                    }
                }
                _ => {}
            }
        }
    }

    /// The declarations of a `style` attribute that inscriptis reads.
    fn apply_css(&mut self, css: &str) {
        let css = css.to_lowercase();
        for declaration in css.split(';') {
            let Some((key, value)) = declaration.split_once(':') else {
                continue;
            };
            // inscriptis names its handlers after the key, so `margin_top` works too.
            let key = key
                .trim_matches(is_python_space)
                .replace("-webkit-", "")
                .replace('_', "-");
            let value = value.trim_matches(is_python_space);
            match key.as_str() {
                "display" if self.display != Display::None => {
                    self.display = match value {
                        "block" => Display::Block,
                        "none" => Display::None,
                        _ => Display::Inline,
                    };
                }
                "white-space" => match value {
                    "normal" | "nowrap" => self.whitespace = WhiteSpace::Normal,
                    "pre" | "pre-line" | "pre-wrap" => self.whitespace = WhiteSpace::Pre,
                    _ => {}
                },
                "margin-top" | "margin-before" => {
                    if let Some(em) = em_length(value) {
                        self.margin_before = em;
                    }
                }
                "margin-bottom" | "margin-after" => {
                    if let Some(em) = em_length(value) {
                        self.margin_after = em;
                    }
                }
                "padding-left" | "padding-start" => {
                    if let Some(em) = em_length(value) {
                        self.padding = em;
                    }
                }
                "horizontal-align" => {
                    if let Some(a) = align(value) {
                        self.align = a;
                    }
                }
                "vertical-align" => {
                    if let Some(v) = valign(value) {
                        self.valign = v;
                    }
                }
                _ => {}
            }
        }
    }

    /// This style as the child of `parent` (inscriptis's refinement: hidden stays hidden, a
    /// block in a block remembers the parent's bottom margin; whitespace is not inherited).
    fn refined(mut self, parent: &Style) -> Style {
        self.canvas = parent.canvas;
        if parent.display == Display::None {
            self.display = Display::None;
            return self;
        }
        if self.limit_whitespace_affixes && parent.whitespace == WhiteSpace::Pre {
            if is_all_python_space(self.prefix) {
                self.prefix = "";
            }
            if is_all_python_space(self.suffix) {
                self.suffix = "";
            }
        }
        if self.display == Display::Block && parent.display == Display::Block {
            self.previous_margin_after = parent.margin_after;
        }
        self
    }
}

fn align(value: &str) -> Option<Align> {
    match value {
        "left" => Some(Align::Left),
        "right" => Some(Align::Right),
        "center" => Some(Align::Center),
        _ => None,
    }
}

fn valign(value: &str) -> Option<VAlign> {
    match value {
        "top" => Some(VAlign::Top),
        "middle" => Some(VAlign::Middle),
        "bottom" => Some(VAlign::Bottom),
        _ => None,
    }
}

/// A CSS length in em, as inscriptis reads it: the first `<number><unit>` in the value, eight
/// pixels (or anything but em) to the em, rounded half to even.
fn em_length(value: &str) -> Option<i64> {
    let chars: Vec<char> = value.chars().collect();
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    for start in 0..chars.len() {
        let mut end = start;
        if chars[end] == '-' {
            end += 1;
        }
        let digits_start = end;
        while end < chars.len() && (chars[end].is_ascii_digit() || chars[end] == '.') {
            end += 1;
        }
        if end == digits_start {
            continue;
        }
        // The number is as long as it can be while a word character follows it.
        let mut number_end = end;
        while number_end > digits_start {
            if number_end < chars.len() && is_word(chars[number_end]) {
                break;
            }
            number_end -= 1;
        }
        if number_end == digits_start {
            continue;
        }
        let unit_end = (number_end..chars.len())
            .find(|&i| !is_word(chars[i]))
            .unwrap_or(chars.len());
        let number: String = chars[start..number_end].iter().collect();
        let unit: String = chars[number_end..unit_end].iter().collect();
        let mut n: f64 = number.parse().ok()?;
        if !matches!(unit.as_str(), "em" | "qem" | "rem") {
            n /= 8.0;
        }
        return Some((n.round_ties_even() as i64).min(100_000));
    }
    None
}

fn is_all_python_space(s: &str) -> bool {
    !s.is_empty() && s.chars().all(is_python_space)
}

fn spaces(n: i64) -> String {
    " ".repeat(n.max(0) as usize)
}

fn char_len(s: &str) -> i64 {
    s.chars().count() as i64
}

/// Indentation and bullets of the lines of a canvas.
#[derive(Debug, Default)]
struct Prefix {
    current_padding: i64,
    paddings: Vec<i64>,
    bullets: Vec<String>,
    consumed: bool,
}

impl Prefix {
    fn register(&mut self, padding: i64, bullet: &str) {
        self.current_padding += padding;
        self.paddings.push(padding);
        self.bullets.push(bullet.to_string());
    }

    fn remove_last(&mut self) {
        if let Some(p) = self.paddings.pop() {
            self.current_padding -= p;
            self.bullets.pop();
        }
    }

    /// The innermost bullet not yet written, taken.
    fn pop_next_bullet(&mut self) -> String {
        match self.bullets.iter_mut().rev().find(|b| !b.is_empty()) {
            Some(b) => std::mem::take(b),
            None => String::new(),
        }
    }

    /// What starts a new line: the indentation and a bullet, once per line.
    fn first(&mut self) -> String {
        if self.consumed {
            return String::new();
        }
        self.consumed = true;
        let bullet = self.pop_next_bullet();
        spaces(self.current_padding - char_len(&bullet)) + &bullet
    }

    /// A bullet of an item that wrote nothing, on a line of its own.
    fn unconsumed_bullet(&mut self) -> String {
        if self.consumed {
            return String::new();
        }
        let bullet = self.pop_next_bullet();
        if bullet.is_empty() {
            return bullet;
        }
        let padding = self.current_padding - self.paddings.last().copied().unwrap_or(0);
        spaces(padding - char_len(&bullet)) + &bullet
    }

    /// The indentation of the further lines of preformatted text.
    fn rest(&self) -> String {
        spaces(self.current_padding)
    }
}

/// Where text is drawn: finished lines (blocks) and the line being written.
#[derive(Debug)]
struct Canvas {
    margin: i64,
    blocks: Vec<String>,
    prefix: Prefix,
    line: String,
    collapsable_whitespace: bool,
    /// A table cell's: how it is aligned in its column and row.
    align: Align,
    valign: VAlign,
}

impl Canvas {
    fn new() -> Canvas {
        Canvas {
            margin: 1000,
            blocks: Vec::new(),
            prefix: Prefix::default(),
            line: String::new(),
            collapsable_whitespace: true,
            align: Align::Left,
            valign: VAlign::Middle,
        }
    }

    fn open_tag(&mut self, style: &Style) {
        if style.display == Display::Block {
            self.open_block(style);
        }
    }

    fn open_block(&mut self, style: &Style) {
        if !self.flush_inline() && !style.list_bullet.is_empty() {
            self.write_unconsumed_bullet();
        }
        self.prefix.register(style.padding, &style.list_bullet);
        let required = style.previous_margin_after.max(style.margin_before);
        if required > self.margin {
            self.blocks
                .push("\n".repeat((required - self.margin - 1) as usize));
            self.margin = required;
        }
    }

    fn write_unconsumed_bullet(&mut self) {
        let bullet = self.prefix.unconsumed_bullet();
        if !bullet.is_empty() {
            self.blocks.push(bullet);
            self.new_line();
            self.margin = 0;
        }
    }

    fn close_tag(&mut self, style: &Style) {
        if style.display == Display::Block {
            if !self.flush_inline() && !style.list_bullet.is_empty() {
                self.write_unconsumed_bullet();
            }
            self.prefix.remove_last();
            self.close_block(style);
        }
    }

    fn close_block(&mut self, style: &Style) {
        if style.margin_after > self.margin {
            self.blocks
                .push("\n".repeat((style.margin_after - self.margin - 1) as usize));
            self.margin = style.margin_after;
        }
    }

    fn write(&mut self, text: &str, whitespace: WhiteSpace) {
        match whitespace {
            WhiteSpace::Pre => self.merge_pre(text),
            WhiteSpace::Normal => self.merge_normal(text),
        }
    }

    fn merge_normal(&mut self, text: &str) {
        let mut normalized = String::new();
        for c in text.chars() {
            if !is_python_space(c) {
                normalized.push(c);
                self.collapsable_whitespace = false;
            } else if !self.collapsable_whitespace {
                normalized.push(' ');
                self.collapsable_whitespace = true;
            }
        }
        if normalized.is_empty() {
            return;
        }
        let text = if self.line.is_empty() {
            self.prefix.first() + &normalized
        } else {
            normalized
        };
        self.line.push_str(&unescape(&text));
    }

    fn merge_pre(&mut self, text: &str) {
        let text = self.prefix.first() + &text.replace('\n', &format!("\n{}", self.prefix.rest()));
        self.line.push_str(&unescape(&text));
        self.collapsable_whitespace = false;
    }

    /// The line being written, without a trailing collapsible space.
    fn line_content(&mut self) -> &str {
        if self.collapsable_whitespace && self.line.ends_with(' ') {
            self.line.pop();
        }
        &self.line
    }

    fn new_line(&mut self) {
        self.prefix.consumed = false;
        self.line.clear();
        self.collapsable_whitespace = true;
    }

    /// Ends the line being written, if it has anything; whether it had.
    fn flush_inline(&mut self) -> bool {
        if self.line_content().is_empty() {
            return false;
        }
        let line = std::mem::take(&mut self.line);
        self.blocks.push(line);
        self.new_line();
        self.margin = 0;
        true
    }

    fn write_newline(&mut self) {
        if !self.flush_inline() {
            self.blocks.push(String::new());
            self.new_line();
        }
    }

    fn text(&mut self) -> String {
        self.flush_inline();
        self.blocks.join("\n")
    }

    /// A cell's lines, once its content is complete.
    fn cell_lines(&mut self) -> Vec<String> {
        self.flush_inline();
        let lines: Vec<String> = self
            .blocks
            .iter()
            .flat_map(|b| b.split('\n'))
            .map(str::to_string)
            .collect();
        if lines.is_empty() {
            vec![String::new()]
        } else {
            lines
        }
    }
}

/// A table being read: rows of cells, each a canvas.
#[derive(Debug, Default)]
struct Table {
    rows: Vec<Vec<CanvasId>>,
}

/// The text of the document rooted at `root`.
pub fn render(root: &Element) -> String {
    let mut body = Style::inline();
    body.canvas = CanvasId(0);
    let mut layout = Layout {
        canvases: vec![Canvas::new()],
        styles: vec![body],
        tables: Vec::new(),
        list_counters: Vec::new(),
    };
    layout.element(root);
    layout.canvases[0].text()
}

/// A list's next bullet: a symbol by nesting depth, or the next number.
#[derive(Debug, Clone)]
enum ListCounter {
    Bullet(&'static str),
    Number(i64),
}

const BULLETS: [&str; 4] = ["* ", "+ ", "o ", "- "];

struct Layout {
    canvases: Vec<Canvas>,
    /// The styles of the open elements, the body's first.
    styles: Vec<Style>,
    tables: Vec<Table>,
    list_counters: Vec<ListCounter>,
}

impl Layout {
    fn current(&mut self) -> &mut Style {
        self.styles
            .last_mut()
            .expect("the body's style is never closed")
    }

    fn canvas(&mut self, id: CanvasId) -> &mut Canvas {
        &mut self.canvases[id.0]
    }

    fn new_canvas(&mut self) -> CanvasId {
        self.canvases.push(Canvas::new());
        CanvasId(self.canvases.len() - 1)
    }

    /// Writes text with the style of the element at `depth` from the top (0: current).
    fn write_styled(&mut self, depth: usize, text: &str) {
        let style = &self.styles[self.styles.len() - 1 - depth];
        if text.is_empty() || style.display == Display::None {
            return;
        }
        let text = format!("{}{}{}", style.prefix, text, style.suffix);
        let (canvas, whitespace) = (style.canvas, style.whitespace);
        self.canvas(canvas).write(&text, whitespace);
    }

    fn element(&mut self, element: &Element) {
        let mut style = Style::of(&element.name);
        style.apply_attributes(element);
        let parent = self.styles.last().expect("body").clone();
        self.styles.push(style.refined(&parent));
        self.start_handler(element);
        let style = self.current().clone();
        self.canvas(style.canvas).open_tag(&style);
        for child in &element.children {
            match child {
                Node::Element(e) => self.element(e),
                Node::Text(t) => self.write_styled(0, t),
                Node::CommentTail(t) => {
                    let style = self.current().clone();
                    self.canvas(style.canvas).write(t, style.whitespace);
                }
                Node::Comment => {}
            }
        }
        self.end_handler(&element.name);
        let style = self.styles.pop().expect("pushed above");
        self.canvas(style.canvas).close_tag(&style);
    }

    fn start_handler(&mut self, element: &Element) {
        match element.name.as_str() {
            "table" => {
                let canvas = self.new_canvas();
                self.current().canvas = canvas;
                self.tables.push(Table::default());
            }
            "tr" => {
                if let Some(table) = self.tables.last_mut() {
                    table.rows.push(Vec::new());
                }
            }
            "td" | "th" if !self.tables.is_empty() => {
                let (align, valign) = (self.current().align, self.current().valign);
                let cell = self.new_canvas();
                self.canvas(cell).align = align;
                self.canvas(cell).valign = valign;
                self.current().canvas = cell;
                let table = self.tables.last_mut().expect("checked");
                if table.rows.is_empty() {
                    table.rows.push(Vec::new());
                }
                table.rows.last_mut().expect("one at least").push(cell);
            }
            "ul" => {
                let bullet = BULLETS[self.list_counters.len() % BULLETS.len()];
                self.list_counters.push(ListCounter::Bullet(bullet));
            }
            "ol" => self.list_counters.push(ListCounter::Number(1)),
            "li" => {
                let value = element
                    .attribute("value")
                    .filter(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_digit()))
                    .and_then(|v| v.parse::<i64>().ok());
                let bullet = match self.list_counters.last_mut() {
                    None => "* ".to_string(),
                    Some(ListCounter::Bullet(b)) => b.to_string(),
                    Some(ListCounter::Number(n)) => {
                        if let Some(v) = value {
                            *n = v;
                        }
                        let bullet = format!("{n}. ");
                        *n += 1;
                        bullet
                    }
                };
                self.current().list_bullet = bullet;
            }
            "br" => {
                let canvas = self.current().canvas;
                self.canvas(canvas).write_newline();
            }
            _ => {}
        }
    }

    fn end_handler(&mut self, name: &str) {
        match name {
            "table" => self.end_table(),
            "ul" | "ol" => {
                self.list_counters.pop();
            }
            "td" | "th" if !self.tables.is_empty() => {
                let style = self.current().clone();
                self.canvas(style.canvas).close_tag(&style);
            }
            _ => {}
        }
    }

    fn end_table(&mut self) {
        let style = self.current().clone();
        if !self.tables.is_empty() {
            self.canvas(style.canvas).close_tag(&style);
        }
        let Some(table) = self.tables.pop() else {
            return;
        };
        // Text inside the table but in no cell goes before it.
        let outside = self.canvas(style.canvas).text();
        let outside = outside.trim_matches(is_python_space);
        if !outside.is_empty() {
            self.write_styled(1, outside);
            let parent_canvas = self.styles[self.styles.len() - 2].canvas;
            self.canvas(parent_canvas).write_newline();
        }
        let text = self.table_text(&table);
        let parent = self.styles[self.styles.len() - 2].clone();
        let canvas = parent.canvas;
        if parent.display == Display::Block {
            self.canvas(canvas).open_block(&parent);
        }
        self.canvas(canvas).write(&text, WhiteSpace::Pre);
        if parent.display == Display::Block {
            self.canvas(canvas).close_block(&parent);
        }
        self.canvas(canvas).flush_inline();
        if parent.display == Display::Block {
            self.canvas(canvas).prefix.remove_last();
        }
    }

    /// The table drawn: every row as tall as its tallest cell, every column as wide as its
    /// widest, cells separated by two spaces.
    fn table_text(&mut self, table: &Table) -> String {
        if table.rows.is_empty() {
            return "\n".into();
        }
        let mut lines: Vec<Vec<Vec<String>>> = table
            .rows
            .iter()
            .map(|row| row.iter().map(|&c| self.canvas(c).cell_lines()).collect())
            .collect();
        let columns = lines.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                lines
                    .iter()
                    .filter_map(|row| row.get(c))
                    .flat_map(|cell| cell.iter().map(|l| l.chars().count()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = Vec::new();
        for (r, row) in lines.iter_mut().enumerate() {
            let height = row.iter().map(Vec::len).max().unwrap_or(0);
            let mut cells = Vec::new();
            for (c, cell) in row.iter_mut().enumerate() {
                let id = table.rows[r][c];
                let (align, valign) = (self.canvases[id.0].align, self.canvases[id.0].valign);
                cells.push(layout_cell(cell, widths[c], height, align, valign));
            }
            for line in 0..height {
                let parts: Vec<&str> = cells.iter().map(|c| c[line].as_str()).collect();
                out.push(parts.join("  "));
            }
            if row.is_empty() {
                out.push(String::new());
            }
        }
        out.join("\n") + "\n"
    }
}

/// A cell's lines padded to its column's width and its row's height.
fn layout_cell(
    lines: &[String],
    width: usize,
    height: usize,
    align: Align,
    valign: VAlign,
) -> Vec<String> {
    let shift = match valign {
        VAlign::Top => 0,
        VAlign::Middle => 1,
        VAlign::Bottom => 2,
    };
    let top = (height - lines.len()) * shift / 2;
    let blank = " ".repeat(width);
    let mut out = vec![blank.clone(); top];
    out.extend(lines.iter().map(|l| aligned(l, width, align)));
    out.resize(height, blank);
    out
}

/// Python's `ljust`, `rjust` and `center`.
fn aligned(text: &str, width: usize, align: Align) -> String {
    let len = text.chars().count();
    if len >= width {
        return text.to_string();
    }
    let margin = width - len;
    let left = match align {
        Align::Left => 0,
        Align::Right => margin,
        Align::Center => margin / 2 + (margin & width & 1),
    };
    format!("{}{}{}", " ".repeat(left), text, " ".repeat(margin - left))
}
