//! ICD-10-CM display names for i2b2 diagnoses, as Cumulus ETL adds them: the code's
//! description, or "Unknown" for a code the table lacks. The table (`icd10cm.tsv.gz`, about
//! 670 KB: 98,520 codes and blocks, sorted) is made by `tools/gen_icd10cm.py` from the
//! tabular list CDC publishes (public domain), and read once, on the first diagnosis.

use std::sync::OnceLock;

const TABLE: &[u8] = include_bytes!("icd10cm.tsv.gz");

/// The display upstream writes for an ICD-10-CM code.
pub fn display(code: &str) -> &'static str {
    static CODES: OnceLock<Codes> = OnceLock::new();
    CODES
        .get_or_init(Codes::load)
        .find(code)
        .unwrap_or("Unknown")
}

/// `code<TAB>description` lines, sorted by code, and where each starts.
struct Codes {
    text: String,
    lines: Vec<(u32, u32, u32)>,
}

impl Codes {
    fn load() -> Codes {
        use std::io::Read;
        let mut text = String::new();
        flate2::read::GzDecoder::new(TABLE)
            .read_to_string(&mut text)
            .expect("the embedded ICD-10-CM table is valid gzip text");
        let mut lines = Vec::with_capacity(100_000);
        let mut start = 0;
        for line in text.split_inclusive('\n') {
            let tab = line.find('\t').expect("a code, a tab, a description");
            let end = start + line.trim_end_matches('\n').len();
            lines.push((start as u32, (start + tab) as u32, end as u32));
            start += line.len();
        }
        Codes { text, lines }
    }

    fn find(&self, code: &str) -> Option<&str> {
        let at = |&(start, tab, _): &(u32, u32, u32)| &self.text[start as usize..tab as usize];
        let i = self.lines.binary_search_by(|l| at(l).cmp(code)).ok()?;
        let (_, tab, end) = self.lines[i];
        Some(&self.text[tab as usize + 1..end as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_blocks_and_seventh_characters_have_their_descriptions() {
        assert_eq!(
            display("A00.0"),
            "Cholera due to Vibrio cholerae 01, biovar cholerae"
        );
        assert_eq!(
            display("R40.2412"),
            "Glasgow coma scale score 13-15, at arrival to emergency department"
        );
        assert_eq!(
            display("S01.00XA"),
            "Unspecified open wound of scalp, initial encounter"
        );
        assert_eq!(display("D55-D59"), "Hemolytic anemias (D55-D59)");
        assert_eq!(display("R40.241"), "Glasgow coma scale score 13-15");
        assert_eq!(display("Z99.99"), "Unknown");
        assert_eq!(display(""), "Unknown");
    }
}
