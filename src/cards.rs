//! `tapgate cards`: card records in the Redis directory.

use crate::common::RedisTarget;
use anyhow::Context as _;
use clap::{Args, Subcommand};
use std::collections::HashMap;
use std::path::PathBuf;
use tapgate_city::population::PopulationSpec;
use tapgate_gateway::card::{CardRecord, CardState};
use tapgate_gateway::config::Config;
use tapgate_gateway::decide::CountedRide;
use tapgate_gateway::directory::{Directory, card_fields, parse_card};
use tapgate_runtime::clock::{local_date, now_ms};
use tapgate_runtime::redis_target::bounded_line;

#[derive(Args)]
pub(crate) struct CardsArgs {
    #[command(flatten)]
    redis: RedisTarget,
    /// Replicas that must hold a change before it is reported done (Redis WAIT): with 1 on a
    /// Redis with replicas, a lost-card report that succeeded survives a failover of its master.
    #[arg(long, default_value_t = 0)]
    wait_replicas: u16,
    #[command(subcommand)]
    action: CardsAction,
}

#[derive(Subcommand)]
enum CardsAction {
    /// Import cards from a CSV file with the header
    /// `card_id,state,issuer,concession,rides_left,expires,home_area,grade,rides_period,renews_on`
    /// (expires and rides_period YYYY-MM-DD, renews_on MM-DD, each empty where it does not
    /// apply). Files with only the first six columns are read too.
    Import { file: PathBuf },
    /// Write a synthetic population of cards and gates (the one the load generator uses).
    Generate(GenerateArgs),
    /// Report a card lost: it is refused by every gateway from now on.
    ReportLost { card_id: u64 },
    /// Block a card.
    Block { card_id: u64 },
    /// Make a lost or blocked card active again.
    Unblock { card_id: u64 },
    /// Print a card's record.
    Show { card_id: u64 },
    /// Add rides to a card's counted concession allowance (the elder card's yearly rides) in the
    /// current period, on the holder's request; every gateway sees the new count at once.
    TopUp(TopUpArgs),
    /// Take a gate out of service (a stolen or retired validator): every gateway closes its
    /// open sessions and refuses its Hello from now on. Provision it again with `generate` or
    /// by writing its record.
    RevokeTerminal { terminal_id: u64 },
}

#[derive(Args)]
struct TopUpArgs {
    card_id: u64,
    /// Rides to add; the concession's `top_up` from the policy when absent.
    #[arg(long)]
    rides: Option<u32>,
    /// The gateways' policy file, for the concession's allowance, renewal and top-up; the
    /// built-in policy when absent.
    #[arg(long)]
    policy: Option<PathBuf>,
}

#[derive(Args)]
struct GenerateArgs {
    #[arg(long, default_value_t = 100_000)]
    cards: u64,
    #[arg(long, default_value_t = 2_000)]
    terminals: u64,
    #[arg(long, default_value_t = 2026)]
    seed: u64,
    /// Shares of the population, each a fraction of 1.
    #[arg(long, default_value_t = 0.12)]
    elder: f64,
    #[arg(long, default_value_t = 0.05)]
    sichuan: f64,
    #[arg(long, default_value_t = 0.03)]
    t_union: f64,
    #[arg(long, default_value_t = 0.01)]
    lost: f64,
    #[arg(long, default_value_t = 0.005)]
    cancelled: f64,
    /// Cards that expired on 2025-12-31.
    #[arg(long, default_value_t = 0.005)]
    expired: f64,
    /// Write the cards to this CSV file instead of Redis.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Write the gates to this CSV file instead of Redis (`terminal_id,area,mode,operator`):
    /// with the defaults, the gates of `tapgate serve --embedded` and the demo.
    #[arg(long)]
    gates_csv: Option<PathBuf>,
}

impl GenerateArgs {
    fn spec(&self) -> PopulationSpec {
        PopulationSpec {
            seed: self.seed,
            cards: self.cards,
            terminals: self.terminals,
            elder: self.elder,
            sichuan: self.sichuan,
            t_union: self.t_union,
            lost: self.lost,
            cancelled: self.cancelled,
            expired: self.expired,
            ..PopulationSpec::default()
        }
    }
}

const CSV_HEADER: &str =
    "card_id,state,issuer,concession,rides_left,expires,home_area,grade,rides_period,renews_on";
/// The header of files written before cards had home areas, grades and allowance periods.
const CSV_HEADER_V1: &str = "card_id,state,issuer,concession,rides_left,expires";
const BATCH: usize = 1000;

pub(crate) fn run(args: CardsArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: CardsArgs) -> anyhow::Result<()> {
    if let CardsAction::Generate(generate) = &args.action
        && (generate.csv.is_some() || generate.gates_csv.is_some())
    {
        if let Some(path) = &generate.csv {
            write_csv(path, &generate.spec())?;
        }
        if let Some(path) = &generate.gates_csv {
            write_gates_csv(path, &generate.spec())?;
        }
        return Ok(());
    }
    let directory = args.redis.directory(args.wait_replicas)?;
    match args.action {
        CardsAction::Import { file } => {
            let bytes =
                std::fs::read(&file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let records =
                parse_csv(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            for chunk in records.chunks(BATCH) {
                directory.put_cards(chunk).await?;
            }
            println!("imported {} cards", records.len());
        }
        CardsAction::Generate(generate) => {
            let spec = generate.spec();
            let all: Vec<CardRecord> = spec.cards().collect();
            for chunk in all.chunks(BATCH) {
                directory.put_cards(chunk).await?;
            }
            let gates: Vec<_> = spec.terminals().collect();
            for chunk in gates.chunks(BATCH) {
                directory.put_terminals(chunk).await?;
            }
            println!(
                "wrote {} cards and {} gates (seed {})",
                all.len(),
                gates.len(),
                spec.seed
            );
        }
        CardsAction::ReportLost { card_id } => {
            set_state(&directory, card_id, CardState::Lost).await?
        }
        CardsAction::Block { card_id } => {
            set_state(&directory, card_id, CardState::Blocked).await?
        }
        CardsAction::Unblock { card_id } => {
            set_state(&directory, card_id, CardState::Active).await?
        }
        CardsAction::RevokeTerminal { terminal_id } => {
            match directory.terminal(terminal_id).await? {
                Some(_) => {
                    directory.revoke_terminal(terminal_id).await?;
                    println!("gate {terminal_id} revoked");
                }
                None => return Err(anyhow::anyhow!("gate {terminal_id} is not provisioned")),
            }
        }
        CardsAction::TopUp(top_up) => top_up_card(&directory, top_up).await?,
        CardsAction::Show { card_id } => match directory.card(card_id).await? {
            Some(card) => println!("{}", csv_line(&card)),
            None => return Err(anyhow::anyhow!("card {card_id} is not in the directory")),
        },
    }
    Ok(())
}

async fn set_state(directory: &Directory, card_id: u64, state: CardState) -> anyhow::Result<()> {
    directory
        .set_state(card_id, state)
        .await?
        .with_context(|| format!("card {card_id} is not in the directory"))?;
    println!("card {card_id} is now {}", state.label());
    Ok(())
}

async fn top_up_card(directory: &Directory, args: TopUpArgs) -> anyhow::Result<()> {
    // Read as a gateway reads it: the file when given, the built-in policy otherwise.
    let mut config = Config::default();
    config.policy.file = args.policy.clone();
    let policy = config.policy()?;
    let card = directory
        .card(args.card_id)
        .await?
        .with_context(|| format!("card {} is not in the directory", args.card_id))?;
    let allowance = policy
        .concession_rules
        .get(&card.concession)
        .and_then(|rule| rule.allowance)
        .with_context(|| {
            format!(
                "card {} has concession `{}`, which has no counted allowance to top up",
                args.card_id,
                card.concession.label()
            )
        })?;
    let today = local_date(now_ms());
    let ride = CountedRide {
        period: allowance.period_start(card.renews_on, today),
        allowance: allowance.rides,
    };
    let rides = args.rides.unwrap_or(allowance.top_up);
    let left = directory
        .top_up(args.card_id, ride, rides)
        .await?
        .with_context(|| format!("card {} is not in the directory", args.card_id))?;
    println!(
        "card {}: {rides} rides added, {left} left in the period from {}",
        args.card_id, ride.period
    );
    Ok(())
}

fn csv_line(card: &CardRecord) -> String {
    let fields = card_fields(card);
    let value = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    };
    format!(
        "{},{},{},{},{},{},{},{},{},{}",
        card.card_id,
        value("state"),
        value("issuer"),
        value("concession"),
        value("rides"),
        value("expires"),
        value("home"),
        value("grade"),
        value("period"),
        value("renews")
    )
}

fn write_csv(path: &PathBuf, spec: &PopulationSpec) -> anyhow::Result<()> {
    use std::io::Write;
    let file =
        std::fs::File::create(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let io = |e: std::io::Error| anyhow::Error::new(e).context(path.display().to_string());
    writeln!(out, "{CSV_HEADER}").map_err(io)?;
    for card in spec.cards() {
        writeln!(out, "{}", csv_line(&card)).map_err(io)?;
    }
    out.flush().map_err(io)?;
    println!("wrote {} cards to {}", spec.cards, path.display());
    Ok(())
}

fn write_gates_csv(path: &PathBuf, spec: &PopulationSpec) -> anyhow::Result<()> {
    use std::io::Write;
    let file =
        std::fs::File::create(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let io = |e: std::io::Error| anyhow::Error::new(e).context(path.display().to_string());
    writeln!(out, "terminal_id,area,mode,operator").map_err(io)?;
    for gate in spec.terminals() {
        writeln!(
            out,
            "{},{},{},{}",
            gate.terminal_id,
            gate.area,
            gate.mode.label(),
            gate.operator
        )
        .map_err(io)?;
    }
    out.flush().map_err(io)?;
    println!("wrote {} gates to {}", spec.terminals, path.display());
    Ok(())
}

/// The cards of a CSV file's bytes. Every error names its line and stays short, whatever the
/// line held: a byte-order mark, bytes that are not UTF-8, a wrong column count, a bad field, a
/// card id given twice (with both lines).
fn parse_csv(bytes: &[u8]) -> anyhow::Result<Vec<CardRecord>> {
    if bytes.starts_with(b"\xEF\xBB\xBF") {
        anyhow::bail!("line 1: starts with a byte-order mark; save the file as UTF-8 without one");
    }
    let mut lines = bytes.split(|&b| b == b'\n').enumerate().map(|(n, raw)| {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        std::str::from_utf8(raw)
            .map(|line| (n + 1, line))
            .map_err(|e| {
                anyhow::anyhow!(
                    "line {}: not UTF-8 (byte {} of the line)",
                    n + 1,
                    e.valid_up_to() + 1
                )
            })
    });
    let columns = match lines.next().transpose()? {
        Some((_, header)) if header.trim() == CSV_HEADER => 1 + CSV_COLUMNS.len(),
        Some((_, header)) if header.trim() == CSV_HEADER_V1 => 6,
        _ => return Err(anyhow::anyhow!("the first line must be `{CSV_HEADER}`")),
    };
    let mut records = Vec::new();
    let mut first_seen: HashMap<u64, usize> = HashMap::new();
    let mut repeated = Vec::new();
    for line in lines {
        let (n, line) = line?;
        if line.trim().is_empty() {
            continue;
        }
        let record = parse_csv_line(line, columns)
            .map_err(|e| anyhow::anyhow!(bounded_line(&format!("line {n}: {e}"))))?;
        match first_seen.entry(record.card_id) {
            std::collections::hash_map::Entry::Occupied(first) => {
                repeated.push(format!(
                    "card {} on lines {} and {n}",
                    record.card_id,
                    first.get()
                ));
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(n);
                records.push(record);
            }
        }
    }
    if !repeated.is_empty() {
        let shown = repeated.len().min(10);
        return Err(anyhow::anyhow!(
            "{} card ids appear more than once ({}{})",
            repeated.len(),
            repeated[..shown].join("; "),
            if repeated.len() > shown { "; …" } else { "" }
        ));
    }
    Ok(records)
}

/// The directory's field for each CSV column after the card id, in order.
const CSV_COLUMNS: [&str; 9] = [
    "state",
    "issuer",
    "concession",
    "rides",
    "expires",
    "home",
    "grade",
    "period",
    "renews",
];

fn parse_csv_line(line: &str, columns: usize) -> anyhow::Result<CardRecord> {
    let cols: Vec<&str> = line.split(',').map(str::trim).collect();
    if cols.len() != columns {
        return Err(anyhow::anyhow!(
            "expected {columns} columns, found {}",
            cols.len()
        ));
    }
    let id = cols[0];
    let card_id: u64 = id
        .parse()
        .map_err(|_| anyhow::anyhow!("card_id `{id}` is not a number"))?;
    let fields = CSV_COLUMNS
        .iter()
        .zip(&cols[1..])
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    parse_card(card_id, &fields).map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_csv_parses_back_to_the_same_cards() {
        let spec = PopulationSpec {
            cards: 50,
            ..PopulationSpec::default()
        };
        let mut text = format!("{CSV_HEADER}\n");
        for card in spec.cards() {
            text.push_str(&csv_line(&card));
            text.push('\n');
        }
        assert_eq!(
            parse_csv(text.as_bytes()).unwrap(),
            spec.cards().collect::<Vec<_>>()
        );
    }

    #[test]
    fn bad_csv_lines_name_the_line_and_the_problem() {
        let text = format!("{CSV_HEADER_V1}\n1,active,cq_ssc,none,0,\n2,stolen,cq_ssc,none,0,\n");
        assert_eq!(
            parse_csv(text.as_bytes()).unwrap_err().to_string(),
            "line 3: unknown state `stolen`"
        );
        assert!(
            parse_csv(b"id,state\n")
                .unwrap_err()
                .to_string()
                .contains("first line")
        );
    }

    #[test]
    fn repeated_ids_a_bom_and_other_bytes_are_named_by_line_and_kept_short() {
        let row = |id: u64| format!("{id},active,cq_ssc,none,0,\n");
        let text = format!("{CSV_HEADER_V1}\n{}{}{}{}", row(1), row(2), row(1), row(1));
        assert_eq!(
            parse_csv(text.as_bytes()).unwrap_err().to_string(),
            "2 card ids appear more than once (card 1 on lines 2 and 4; card 1 on lines 2 and 5)"
        );
        let with_bom = [b"\xEF\xBB\xBF".as_slice(), text.as_bytes()].concat();
        assert!(
            parse_csv(&with_bom)
                .unwrap_err()
                .to_string()
                .starts_with("line 1: starts with a byte-order mark")
        );
        let latin1 = [
            format!("{CSV_HEADER_V1}\n{}", row(1)).as_bytes(),
            b"2,active,cq_ssc,none,0,\xE9\n",
        ]
        .concat();
        assert_eq!(
            parse_csv(&latin1).unwrap_err().to_string(),
            "line 3: not UTF-8 (byte 24 of the line)"
        );
        let huge = format!(
            "{CSV_HEADER_V1}\n1,{},cq_ssc,none,0,\n",
            "x".repeat(2_000_000)
        );
        let e = parse_csv(huge.as_bytes()).unwrap_err().to_string();
        assert!(
            e.starts_with("line 2: unknown state") && e.len() < 300,
            "{}",
            e.len()
        );
    }
}
