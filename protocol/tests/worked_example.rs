//! PROTOCOL.md's worked example must be what the code produces, byte for byte.

const SPEC: &str = include_str!("../../PROTOCOL.md");

/// The `name: value` lines of the first text block after `heading`.
fn documented(heading: &str) -> Vec<(String, String)> {
    let start = SPEC
        .find(heading)
        .unwrap_or_else(|| panic!("PROTOCOL.md has `{heading}`"));
    let block = SPEC[start..]
        .split("```text\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .unwrap_or_else(|| panic!("`{heading}` has a text block"));
    block
        .lines()
        .map(|line| {
            let (name, value) = line.split_once(": ").expect("`name: value` lines");
            (name.to_owned(), value.to_owned())
        })
        .collect()
}

#[test]
fn specification_shows_exactly_the_computed_example() {
    assert_eq!(
        documented("## 8. Worked example"),
        tapgate_protocol::example::lines()
    );
}

/// The example under `heading` shows exactly `lines`, and each of its frames opens, under the
/// example's terminal key, as the frame it names.
fn check_version_2_example(
    heading: &str,
    lines: Vec<(String, String)>,
    frames: impl IntoIterator<Item = tapgate_protocol::Frame>,
) {
    let documented = documented(heading);
    assert_eq!(documented, lines);
    let key = tapgate_protocol::MasterKey::from_hex(tapgate_protocol::example::MASTER_KEY_HEX)
        .unwrap()
        .diversify(tapgate_protocol::example::TERMINAL_ID)
        .mac_key();
    for ((name, value), frame) in documented.iter().zip(frames) {
        let sealed = tapgate_protocol::decode_one(&hex::decode(value).unwrap()).unwrap();
        assert_eq!(sealed.open(&key).unwrap(), frame, "{name}");
    }
}

#[test]
fn specification_shows_exactly_the_computed_deny_list_example() {
    check_version_2_example(
        "### 8.1 Version 2: the deny list",
        tapgate_protocol::example::deny_lines(),
        tapgate_protocol::example::deny_frames(),
    );
}

#[test]
fn specification_shows_exactly_the_computed_offline_example() {
    check_version_2_example(
        "### 8.2 Version 2: an offline tap",
        tapgate_protocol::example::offline_lines(),
        tapgate_protocol::example::offline_frames(),
    );
}

#[test]
fn example_frames_open_under_the_derived_key() {
    let key = tapgate_protocol::MasterKey::from_hex(tapgate_protocol::example::MASTER_KEY_HEX)
        .unwrap()
        .diversify(tapgate_protocol::example::TERMINAL_ID)
        .mac_key();
    for ((name, value), frame) in tapgate_protocol::example::lines()
        .into_iter()
        .filter(|(name, _)| name.ends_with("_frame"))
        .zip(tapgate_protocol::example::frames())
    {
        let bytes = hex::decode(value).unwrap();
        let sealed = tapgate_protocol::decode_one(&bytes).unwrap();
        assert_eq!(sealed.open(&key).unwrap(), frame, "{name}");
    }
}

#[test]
fn appendix_a_lists_every_area_of_the_registry() {
    for area in tapgate_protocol::AREAS.iter() {
        let row = format!("| {} | {} | {} |", area.code, area.name_zh, area.name_en);
        assert!(SPEC.contains(&row), "PROTOCOL.md lacks `{row}`");
    }
    let rows = SPEC
        .split("## Appendix A.")
        .nth(1)
        .expect("PROTOCOL.md has Appendix A")
        .lines()
        .filter(|l| l.starts_with("| 5"))
        .count();
    assert_eq!(rows, 41);
}
