//! HTML notes turned into text exactly as the reference turns them (inscriptis over lxml): our
//! conversion against the real inscriptis, installed in the tests' Python, on hand-written
//! notes of the shapes EHR exports have and on thousands of generated ones, sloppy markup
//! included. Positions in the text are what NLP spans count, so any difference fails.

use crate::readers::run_script;
use cumulus_etl::nlp::html::html_to_text;

const INSCRIPTIS: &str = r#"
import json, sys
import inscriptis
docs = json.load(open(sys.argv[1]))
print(json.dumps([inscriptis.get_text(d) for d in docs]))
"#;

/// Each document's text by inscriptis.
fn inscriptis(docs: &[String]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("docs.json");
    std::fs::write(&path, serde_json::to_vec(docs).unwrap()).unwrap();
    let out = run_script(INSCRIPTIS, &[path.to_str().unwrap()]);
    out.as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

fn assert_same_as_inscriptis(docs: &[String]) {
    let expected = inscriptis(docs);
    let mut differing = Vec::new();
    for (doc, want) in docs.iter().zip(&expected) {
        let got = html_to_text(doc);
        if &got != want {
            differing.push(format!(
                "html: {doc:?}\n  inscriptis: {want:?}\n  ours:       {got:?}"
            ));
        }
    }
    assert!(
        differing.is_empty(),
        "{} of {} documents differ; the first ones:\n{}",
        differing.len(),
        docs.len(),
        differing[..differing.len().min(5)].join("\n")
    );
}

#[test]
fn clinical_notes_as_ehr_exports_write_them() {
    let docs: Vec<String> = [
        "<html><head><title>Progress Note</title><style>p { margin: 0 }</style></head>\
         <body><div><b>Chief complaint:</b> cough&nbsp;x 3 days</div>\
         <div style=\"padding-left: 16px\">Denies fever, chills.</div>\
         <p>Assessment &amp; plan:</p><ol><li>Viral URI<li>Rest, fluids</ol>\
         <p>Signed by Dr. A&nbsp;B</p></body></html>",
        "<div>Vitals</div><table><tr><th>BP</th><th align=\"right\">HR</th></tr>\
         <tr><td>120/80</td><td align=\"right\">72</td></tr>\
         <tr><td valign=\"top\">Temp<br>(oral)</td><td>98.6 F</td></tr></table>After table",
        "<p>Line one<br/>Line two<br><br>Line four</p><pre>  preformatted\n    text  here\n</pre>",
        "<ul><li>one<ul><li>nested</li><li>two</li></ul></li><li>three</li></ul>\
         <ol><li value=\"5\">five</li><li>six</li></ol>",
        "Plain text with &lt;angle&gt; brackets &amp;amp; a &quot;quote&quot;\n\nand lines",
        "<?xml version=\"1.0\"?><html xmlns=\"http://www.w3.org/1999/xhtml\"><body>\
         <p>XHTML note</p><!-- comment -->tail <span>a</span><span>b</span></body></html>",
        "<div style=\"display:none\">hidden<br>still hidden</div><div>shown <q>quoted</q></div>",
        "<h1>Title</h1><h2>Sub</h2><blockquote>quoted text</blockquote><hr>end",
        "<p>unclosed paragraph<p>another<div>div in p</div><table><tr><td>cell</table>",
        "<table><tr><td>a<p>para in cell</td><td><ul><li>x<li>y</ul></td></tr></table>",
        "<!-- only a comment -->",
        "   ",
        "<td>cell outside a table</td><tr>row outside</tr>",
        "<div><span style=\"white-space: pre\">  spaced   out  </span></div>",
        "<p style=\"margin-top: 3em; margin-bottom: 24px\">margins</p><p>next</p>",
        "<TABLE BORDER=1 nowrap><TR><TD>outer<table><tr><td>inner</td><td>2</td></tr></table>\
         </TD><TD ALIGN=center VALIGN=bottom>x</TD></TR></TABLE>",
        "<html><head>head text<title>t</title></head><body><body>twice</body>after body</html>",
        "line one\r\nline two<pre>a\r\n  b<br/>c</pre><p/>empty p",
        "<p>before<table> text between <tr> cells<td>c</td></tr></table>after</p>",
        "<ol><li>a<li><p>b</p><li></ol><ul><li></li><li>x</li></ul>",
        "<div>&AMP; &Amp; &#x1F600; &#x110000; &#65536;</div>",
        "<div><div><div>deep</div>shallow</div></div><dl><dt>term<dd>definition</dl>",
        "<b>bold <i>both</b> italic?</i> plain",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(
        // Nested as deep as libxml2 parses (the root at 256) and one deeper, where it stops.
        [253, 254, 255, 400].map(|n| {
            format!(
                "<p>before</p>{}x{}after",
                "<div>".repeat(n),
                "</div>".repeat(n)
            )
        }),
    )
    .collect();
    assert_same_as_inscriptis(&docs);
}

#[test]
fn notes_nested_too_deep_for_the_parser() {
    let docs: Vec<String> = [
        "<span>".repeat(300) + "deep",
        "<table><tr><td>".repeat(100) + "cell",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_same_as_inscriptis(&docs);
}

#[test]
fn generated_notes_with_sloppy_markup() {
    let mut generator = Generator { state: 0x2545_f491 };
    let docs: Vec<String> = (0..6000).map(|_| generator.document()).collect();
    assert_same_as_inscriptis(&docs);
}

/// Random HTML documents from a fixed seed: nested blocks, inline elements, lists, tables,
/// preformatted text, styles, entities and whitespace, with unclosed and stray tags.
struct Generator {
    state: u64,
}

const WORDS: [&str; 16] = [
    "cough",
    "fever",
    "Dr.",
    "BP",
    "120/80",
    "denies",
    "&amp;",
    "&lt;b&gt;",
    "&nbsp;",
    "&copy",
    "&#233;t&eacute;",
    "&amp;lt;",
    "naïve",
    "x&notit;",
    "AT&T",
    "\u{a0}",
];
const SPACES: [&str; 6] = [" ", "  ", "\n", "\t ", "", "\n  \n"];
const BLOCKS: [&str; 12] = [
    "div",
    "p",
    "h2",
    "blockquote",
    "pre",
    "center",
    "li",
    "xmp",
    "DIV",
    "dl",
    "dd",
    "address",
];
const INLINES: [&str; 9] = ["span", "b", "i", "q", "font", "a", "em", "Span", "td"];
const STYLES: [&str; 10] = [
    "display:none",
    "display: block",
    "display:inline",
    "margin-top: 10px",
    "margin-bottom:2em",
    "padding-left: 3em",
    "white-space: pre",
    "vertical-align: bottom",
    "MARGIN-TOP:1EM; padding-left:-8px",
    "margin-top: 100",
];

impl Generator {
    fn next(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn document(&mut self) -> String {
        let mut out = String::new();
        if self.chance(20) {
            out.push_str("<html><head><title>t</title><style>p{}</style></head><body>");
        }
        let parts = 1 + self.next() % 4;
        for _ in 0..parts {
            self.content(&mut out, 3);
        }
        if self.chance(30) {
            out.push_str("</body></html>");
        }
        out
    }

    fn text(&mut self, out: &mut String) {
        let words = 1 + self.next() % 4;
        for _ in 0..words {
            out.push_str(self.pick(&SPACES));
            out.push_str(self.pick(&WORDS));
        }
        out.push_str(self.pick(&SPACES));
    }

    fn attributes(&mut self, out: &mut String) {
        if self.chance(25) {
            out.push_str(&format!(" style=\"{}\"", self.pick(&STYLES)));
        }
        if self.chance(10) {
            out.push_str(&format!(
                " align=\"{}\"",
                self.pick(&["right", "center", "left"])
            ));
        }
    }

    fn content(&mut self, out: &mut String, depth: u32) {
        match self.next() % 10 {
            0..=2 => self.text(out),
            _ if depth == 0 => self.text(out),
            3 | 4 => {
                let name = self.pick(&BLOCKS);
                self.element(out, name, depth)
            }
            5 | 6 => {
                let name = self.pick(&INLINES);
                self.element(out, name, depth)
            }
            7 => self.list(out, depth),
            8 => self.table(out, depth),
            _ => match self.next() % 9 {
                0 => out.push_str("<br>"),
                1 => out.push_str("<!-- note -->"),
                2 => out.push_str("</p>"),
                3 => out.push_str("<hr/>"),
                4 => out.push_str("<script>if (a<b) { x = '</div>' }</script>"),
                5 => out.push_str("<textarea>a &amp; <b>b</b></textarea>"),
                6 => out.push_str("<img src=x alt=picture><wbr>"),
                7 => out.push_str("< not a tag &"),
                _ => out.push_str("</div>"),
            },
        }
    }

    fn element(&mut self, out: &mut String, name: &str, depth: u32) {
        out.push('<');
        out.push_str(name);
        self.attributes(out);
        out.push('>');
        let children = 1 + self.next() % 3;
        for _ in 0..children {
            self.content(out, depth - 1);
        }
        if !self.chance(15) {
            out.push_str(&format!("</{name}>"));
        }
    }

    fn list(&mut self, out: &mut String, depth: u32) {
        let name = self.pick(&["ul", "ol"]);
        out.push_str(&format!("<{name}>"));
        let items = 1 + self.next() % 3;
        for _ in 0..items {
            out.push_str("<li>");
            self.content(out, depth - 1);
            if self.chance(70) {
                out.push_str("</li>");
            }
        }
        out.push_str(&format!("</{name}>"));
    }

    fn table(&mut self, out: &mut String, depth: u32) {
        out.push_str("<table>");
        let rows = 1 + self.next() % 3;
        for _ in 0..rows {
            out.push_str("<tr>");
            let cells = self.next() % 4;
            for _ in 0..cells {
                let cell = self.pick(&["td", "th"]);
                out.push('<');
                out.push_str(cell);
                if self.chance(20) {
                    out.push_str(self.pick(&[" valign=top", " valign=bottom", " align=center"]));
                }
                out.push('>');
                self.content(out, depth - 1);
                if self.chance(70) {
                    out.push_str(&format!("</{cell}>"));
                }
            }
            if self.chance(70) {
                out.push_str("</tr>");
            }
        }
        out.push_str("</table>");
    }
}
