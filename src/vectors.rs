//! `tapgate vectors`: the specification's worked example, and with `--json` a vector for every
//! frame type in both directions, for gate vendors to test their own implementation against.

use clap::Args;

#[derive(Args)]
pub(crate) struct VectorsArgs {
    /// Print every vector as JSON (every frame type, every deny reason and Error code, a resend).
    #[arg(long)]
    json: bool,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn run(args: VectorsArgs) -> anyhow::Result<()> {
    use tapgate_protocol::example;
    if !args.json {
        for (name, value) in example::lines() {
            println!("{name}: {value}");
        }
        return Ok(());
    }
    let keys: serde_json::Map<String, serde_json::Value> = example::lines()
        .into_iter()
        .take_while(|(name, _)| !name.ends_with("_mac_input"))
        .map(|(name, value)| (name, serde_json::Value::String(value)))
        .collect();
    let vectors: Vec<serde_json::Value> = example::vectors()
        .iter()
        .map(|v| {
            serde_json::json!({
                "name": v.name,
                "direction": v.direction,
                "note": v.note,
                "fields": format!("{:?}", v.frame),
                "mac_input": hex(&v.mac_input),
                "tag": hex(&v.wire[v.mac_input.len()..]),
                "frame": hex(&v.wire),
            })
        })
        .collect();
    let document = serde_json::json!({
        "key_version": 1,
        "keys": keys,
        "vectors": vectors,
    });
    println!("{}", serde_json::to_string_pretty(&document)?);
    Ok(())
}
