//! Object locations (`src/store/objects.rs`) in a local folder and in a real S3-compatible
//! server: listing, whole and ranged reads, streaming, atomic and conditional writes, deletes,
//! SSE-KMS, and clear errors.

use std::io::Read;

use bytes::Bytes;
use cumulus_etl::store::objects::{ObjectEntry, ObjectLocation, S3Settings};

use crate::s3_server::S3Server;

/// The same checks on any location.
fn exercise(location: &ObjectLocation) {
    assert_eq!(location.list().unwrap(), Vec::<ObjectEntry>::new());
    assert_eq!(location.read("missing.json").unwrap(), None);
    let body: Vec<u8> = (0..100_000u32).flat_map(|i| i.to_le_bytes()).collect();
    location
        .write("b/big.bin", Bytes::from(body.clone()))
        .unwrap();
    location
        .write("a.json", Bytes::from_static(b"{\"v\":1}"))
        .unwrap();
    location
        .write("a.json", Bytes::from_static(b"{\"v\":2}"))
        .unwrap();
    assert_eq!(
        location.list().unwrap(),
        vec![
            ObjectEntry {
                key: "a.json".into(),
                size: 7
            },
            ObjectEntry {
                key: "b/big.bin".into(),
                size: body.len() as u64
            },
        ]
    );
    assert_eq!(
        location.read("a.json").unwrap().unwrap(),
        Bytes::from_static(b"{\"v\":2}")
    );
    assert_eq!(
        location.read_range("b/big.bin", 4..12).unwrap(),
        Bytes::copy_from_slice(&body[4..12])
    );
    let mut streamed = Vec::new();
    location
        .open("b/big.bin")
        .unwrap()
        .read_to_end(&mut streamed)
        .unwrap();
    assert_eq!(streamed, body);
    // Put-if-absent: the first writer wins, the second is told.
    assert!(
        location
            .create("log/0.json", Bytes::from_static(b"first"))
            .unwrap()
    );
    assert!(
        !location
            .create("log/0.json", Bytes::from_static(b"second"))
            .unwrap()
    );
    assert_eq!(
        location.read("log/0.json").unwrap().unwrap(),
        Bytes::from_static(b"first")
    );
    location.delete("a.json").unwrap();
    location.delete("a.json").unwrap();
    assert_eq!(location.read("a.json").unwrap(), None);
    assert_eq!(location.list().unwrap().len(), 2);
}

#[test]
fn a_local_folder_behaves_as_an_object_location() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("phi");
    let location = ObjectLocation::parse(path.to_str().unwrap(), &S3Settings::default()).unwrap();
    exercise(&location);
    assert!(path.join("b/big.bin").is_file());
}

#[test]
fn an_s3_prefix_behaves_as_an_object_location_with_every_object_encrypted_by_the_kms_key() {
    let server = S3Server::start();
    server.create_bucket("hospital");
    let settings = S3Settings {
        kms_key: Some("arn:aws:kms:us-east-1:123456789012:key/cumulus".into()),
        ..server.settings()
    };
    let location = ObjectLocation::parse("s3://hospital/phi/", &settings).unwrap();
    exercise(&location);
    for key in ["phi/b/big.bin", "phi/log/0.json"] {
        let (encryption, key_id) = server.encryption("hospital", key);
        assert_eq!(encryption, "aws:kms", "{key}");
        assert_eq!(Some(key_id.as_str()), settings.kms_key.as_deref(), "{key}");
    }
    // Objects outside the prefix are not the location's.
    let other = ObjectLocation::parse("s3://hospital/other", &server.settings()).unwrap();
    assert!(other.list().unwrap().is_empty());
}

#[test]
fn a_missing_bucket_is_one_line_naming_the_url() {
    let server = S3Server::start();
    let location = ObjectLocation::parse("s3://no-such-bucket/phi", &server.settings()).unwrap();
    let err = location
        .write("codebook.json", Bytes::from_static(b"{}"))
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.starts_with("s3://no-such-bucket/phi/codebook.json: "),
        "{text}"
    );
    assert!(text.contains("the bucket does not exist"), "{text}");
    assert!(!text.contains('\n'), "{text}");
}

#[test]
fn locations_that_are_not_folders_or_s3_are_refused() {
    let err = ObjectLocation::parse("gs://bucket/x", &S3Settings::default()).unwrap_err();
    assert!(
        err.to_string()
            .contains("gs:// locations are not supported"),
        "{err}"
    );
    let err = ObjectLocation::parse("s3:///x", &S3Settings::default()).unwrap_err();
    assert!(err.to_string().contains("names no bucket"), "{err}");
}

#[test]
fn a_codebook_in_s3_saves_the_same_files_as_in_a_folder_and_reopens_with_its_mappings() {
    use cumulus_etl::deid::Codebook;
    let server = S3Server::start();
    server.create_bucket("phi-bucket");
    let tmp = tempfile::tempdir().unwrap();
    let folder = ObjectLocation::local(tmp.path()).unwrap();
    let bucket = ObjectLocation::parse("s3://phi-bucket/site", &server.settings()).unwrap();
    let codebook = br#"{"version":1,"id_salt":"e359591c","codebook_id":"site-codebook"}"#;
    for phi in [&folder, &bucket] {
        phi.write("codebook.json", Bytes::from_static(codebook))
            .unwrap();
        let cb = Codebook::open(phi, true).unwrap();
        for id in ["p1", "p2"] {
            cb.fake_id("Patient", id, true);
        }
        cb.fake_id("Encounter", "e1", true);
        cb.save().unwrap();
    }
    for file in ["codebook.json", "codebook-cached-mappings.json"] {
        let local = folder.read(file).unwrap().expect(file);
        assert_eq!(bucket.read(file).unwrap().as_ref(), Some(&local), "{file}");
    }
    let again = Codebook::open(&bucket, true).unwrap();
    let local = Codebook::open(&folder, true).unwrap();
    assert_eq!(again.codebook_id(), "site-codebook");
    for id in ["p1", "p2"] {
        assert_eq!(
            again.fake_id("Patient", id, true),
            local.fake_id("Patient", id, true)
        );
    }
}
