//! Golden fixtures: every control message as the JSON on the wire, data
//! frames, and file-hash examples. The browser client's tests read the same
//! files in `fixtures/transfer/`.

use std::path::PathBuf;

use peerlink_transfer::*;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/transfer")
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn path(s: &str) -> RelPath {
    RelPath::parse(s).unwrap()
}

/// Parses the fixture, compares it with `expected`, and checks that
/// `to_json` gives back the fixture byte for byte.
fn check(name: &str, expected: Ctl) {
    let rel = format!("ctl/{name}.json");
    let text = read(&rel);
    let wire = text.strip_suffix('\n').unwrap_or(&text);
    assert_eq!(Ctl::from_json(wire).unwrap(), expected, "{rel} parses to the expected value");
    assert_eq!(expected.to_json(), wire, "{rel} serializes back byte for byte");
    assert_eq!(expected.kind(), name);
}

#[test]
fn control_messages() {
    check("manifest", Ctl::Manifest { version: 1, chunk_size: 1 << 20, entries: 4, bytes: 123_013 });
    check(
        "manifest_part",
        Ctl::ManifestPart {
            entries: vec![
                Entry::dir(path("photos")),
                Entry::file(path("photos/été 1.jpg"), 123_000),
                Entry::file(path("empty.txt"), 0),
                Entry::text(path("message"), 13),
            ],
        },
    );
    check("manifest_end", Ctl::ManifestEnd);
    let hashes = hashes_to_hex(&[chunk_hash(b"a"), chunk_hash(b"")]);
    check("hashes", Ctl::Hashes { file: 0, from: 0, hashes });
    check("accept", Ctl::Accept);
    check("decline", Ctl::Decline { reason: "not now".into() });
    check("get_hashes", Ctl::GetHashes { file: 0, from: 256 });
    check("want", Ctl::Want { file: 0, ranges: vec![[0, 16], [20, 21]] });
    check("done", Ctl::Done { files: 3, bytes: 123_013 });
    check(
        "cancel",
        Ctl::Cancel {
            code: CancelCode::DiskFull,
            reason: "writing photos/été 1.jpg: No space left on device".into(),
        },
    );
}

/// The fixture manifest is a valid one, and a sender announces it as the
/// fixtures say.
#[test]
fn fixture_manifest_is_what_a_sender_announces() {
    let Ctl::ManifestPart { entries } = Ctl::from_json(read("ctl/manifest_part.json").trim_end()).unwrap()
    else {
        panic!("a part")
    };
    let manifest = Manifest::new(DEFAULT_CHUNK_SIZE, entries).unwrap();
    let messages: Vec<String> = manifest.to_ctl_messages().iter().map(Ctl::to_json).collect();
    let files: Vec<String> = ["manifest", "manifest_part", "manifest_end"]
        .iter()
        .map(|n| read(&format!("ctl/{n}.json")))
        .collect();
    assert_eq!(messages, files.iter().map(|f| f.trim_end()).collect::<Vec<_>>());
}

/// Every fixture file has a check above.
#[test]
fn every_fixture_is_checked() {
    let mut names: Vec<String> = std::fs::read_dir(root().join("ctl"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    // Without whitespace, so a check that rustfmt wrapped still counts.
    let this: String = include_str!("golden.rs").split_whitespace().collect();
    for name in &names {
        let stem = name.strip_suffix(".json").expect("only .json files");
        assert!(this.contains(&format!("check(\"{stem}\"")), "fixture {name} has no check");
    }
    assert_eq!(names.len(), 10, "one per message type");
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

#[test]
fn data_frames() {
    let doc: Value = serde_json::from_str(&read("frames.json")).unwrap();
    let examples = doc["examples"].as_array().unwrap();
    assert_eq!(examples.len(), 2);
    for ex in examples {
        let file = ex["file"].as_u64().unwrap() as u32;
        let offset = ex["offset"].as_u64().unwrap();
        let payload = unhex(ex["payload"].as_str().unwrap());
        let frame = unhex(ex["frame"].as_str().unwrap());
        assert_eq!(encode_frame(file, offset, &payload), frame);
        assert_eq!(decode_frame(&frame).unwrap(), (file, offset, &payload[..]));
    }
}

#[test]
fn file_hashes() {
    let doc: Value = serde_json::from_str(&read("hashes.json")).unwrap();
    let examples = doc["examples"].as_array().unwrap();
    assert_eq!(examples.len(), 5);
    for ex in examples {
        let name = ex["name"].as_str().unwrap();
        let chunk_size = ex["chunk_size"].as_u64().unwrap() as u32;
        let size = ex["size"].as_u64().unwrap() as usize;
        let content = &ex["content"];
        let data: Vec<u8> = if let Some(text) = content["utf8"].as_str() {
            text.as_bytes().to_vec()
        } else {
            let m = content["mod"].as_u64().unwrap() as usize;
            (0..size).map(|i| (i % m) as u8).collect()
        };
        assert_eq!(data.len(), size, "{name}");
        let hashes: Vec<Hash> = data.chunks(chunk_size as usize).map(chunk_hash).collect();
        let want: Vec<&str> =
            ex["chunk_hashes"].as_array().unwrap().iter().map(|h| h.as_str().unwrap()).collect();
        assert_eq!(hashes.iter().map(|h| to_hex(h)).collect::<Vec<_>>(), want, "{name}: chunk hashes");
        let fh = file_hash(size as u64, chunk_size, &hashes);
        assert_eq!(to_hex(&fh), ex["file_hash"].as_str().unwrap(), "{name}: file hash");
    }
    // The chunk size is part of the file hash even for an empty file.
    assert_ne!(examples[0]["file_hash"], examples[1]["file_hash"]);
}

/// Every message example in `docs/TRANSFER.md` parses, and the manifest
/// example is a valid manifest whose header matches its part, so the spec's
/// examples cannot drift from the code.
#[test]
fn spec_examples_parse() {
    let spec =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/TRANSFER.md"))
            .unwrap();
    let mut examples = Vec::new();
    for (at, _) in spec.match_indices(r#"{"type":"#) {
        // The object ends where its braces balance.
        let mut depth = 0;
        let end = spec[at..]
            .char_indices()
            .find_map(|(i, c)| {
                depth += match c {
                    '{' => 1,
                    '}' => -1,
                    _ => 0,
                };
                (depth == 0).then_some(at + i + 1)
            })
            .unwrap();
        let text = &spec[at..end];
        if !text.contains('<') {
            examples.push(Ctl::from_json(text).unwrap_or_else(|e| panic!("{text}: {e}")));
        }
    }
    let kinds: std::collections::BTreeSet<&str> = examples.iter().map(Ctl::kind).collect();
    assert_eq!(kinds.len(), 9, "every type but `hashes` (a placeholder) has an example: {kinds:?}");
    let Some(Ctl::Manifest { chunk_size, entries, bytes, .. }) =
        examples.iter().find(|m| m.kind() == "manifest")
    else {
        panic!("manifest example")
    };
    let Some(Ctl::ManifestPart { entries: part }) = examples.iter().find(|m| m.kind() == "manifest_part")
    else {
        panic!("part example")
    };
    let manifest = Manifest::new(*chunk_size, part.clone()).unwrap();
    assert_eq!((manifest.entries().len() as u64, manifest.total_bytes()), (*entries, *bytes));
    let Some(Ctl::Done { files, bytes }) = examples.iter().find(|m| m.kind() == "done") else {
        panic!("done")
    };
    assert_eq!((*files, *bytes), (u64::from(manifest.file_count()), manifest.total_bytes()));
}
