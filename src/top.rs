//! `tapgate top`: the operators' live figures in a terminal, for one node or several.
//!
//! Every second it reads each node's `/metrics` and `/readyz`, works out rates and latency
//! quantiles from the change since the last reading ([`Figures::between`], a pure function), and
//! draws them with ratatui. `q` or Ctrl-C quits; `--once` prints one reading as text and exits.

use crate::scrape::{self, OpsClient};
use clap::Args;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Args)]
pub(crate) struct TopArgs {
    /// Ops endpoints of gateways and settlers (`tapgate serve` listens on 127.0.0.1:9433 and
    /// `tapgate settle run` on 127.0.0.1:9434 by default).
    #[arg(default_value = "http://127.0.0.1:9433")]
    urls: Vec<String>,
    /// Print one reading (over one second) as text and exit.
    #[arg(long)]
    once: bool,
}

/// What one node showed at one moment.
#[derive(Debug, Clone, Default)]
struct Reading {
    /// Samples by name and label set (`{a="b",…}` as written, or empty).
    samples: BTreeMap<(String, String), f64>,
    ready: Option<bool>,
    reasons: Vec<String>,
}

impl Reading {
    fn parse(metrics: &str) -> Self {
        let mut samples = BTreeMap::new();
        for line in metrics.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, format!("{{{labels}")),
                None => (series, String::new()),
            };
            samples.insert((name.to_owned(), labels), value);
        }
        Self {
            samples,
            ..Self::default()
        }
    }

    /// The sum of a metric's samples whose labels contain `with` (empty: all).
    fn sum(&self, name: &str, with: &str) -> f64 {
        self.samples
            .iter()
            .filter(|((n, labels), _)| n == name && labels.contains(with))
            .map(|(_, v)| v)
            .sum()
    }

    /// Cumulative bucket counts by upper bound.
    fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let mut out: Vec<(f64, f64)> = self
            .samples
            .iter()
            .filter(|((n, _), _)| *n == format!("{name}_bucket"))
            .filter_map(|((_, labels), v)| {
                let le = labels.split("le=\"").nth(1)?.split('"').next()?;
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((bound, *v))
            })
            .collect();
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        out
    }
}

/// The figures of one node over the time between two readings.
#[derive(Debug, Clone, PartialEq)]
struct Figures {
    taps_per_s: f64,
    approved_per_s: f64,
    denied_per_s: f64,
    busy_per_s: f64,
    p50_s: Option<f64>,
    p99_s: Option<f64>,
    gates: f64,
    /// The deny list's version at a gateway (`None` at a settler): the same at every gateway
    /// of a city but for a change on its way.
    deny_version: Option<f64>,
    settled_per_s: f64,
    backlog: f64,
    modes: Vec<(&'static str, f64)>,
}

const MODES: [&str; 5] = ["bus", "metro", "ferry", "cableway", "intercity_rail"];

impl Figures {
    fn between(now: &Reading, before: &Reading, seconds: f64) -> Self {
        let rate = |name: &str, with: &str| {
            ((now.sum(name, with) - before.sum(name, with)) / seconds.max(1e-3)).max(0.0)
        };
        let quantile = |q: f64| {
            let (now, before) = (
                now.buckets("tapgate_answer_latency_seconds"),
                before.buckets("tapgate_answer_latency_seconds"),
            );
            let gained: Vec<(f64, f64)> = now
                .iter()
                .map(|(le, n)| {
                    let earlier = before.iter().find(|(b, _)| b == le).map_or(0.0, |x| x.1);
                    (*le, n - earlier)
                })
                .collect();
            let total = gained.last()?.1;
            (total > 0.0)
                .then(|| gained.iter().find(|(_, n)| *n >= q * total).map(|x| x.0))
                .flatten()
        };
        Figures {
            taps_per_s: rate("tapgate_answers_total", ""),
            approved_per_s: rate("tapgate_answers_total", "outcome=\"approve\""),
            denied_per_s: rate("tapgate_answers_total", "outcome=\"deny\""),
            busy_per_s: rate("tapgate_answers_total", "outcome=\"busy\""),
            p50_s: quantile(0.5),
            p99_s: quantile(0.99),
            gates: now.sum("tapgate_gates_connected", ""),
            deny_version: now
                .samples
                .get(&("tapgate_deny_list_version".to_owned(), String::new()))
                .copied(),
            settled_per_s: rate("tapgate_settled_taps_total", ""),
            backlog: now.sum("tapgate_forwarder_backlog_taps", ""),
            modes: MODES
                .iter()
                .map(|m| {
                    (
                        *m,
                        rate("tapgate_mode_answers_total", &format!("mode=\"{m}\"")),
                    )
                })
                .collect(),
        }
    }
}

fn duration(s: Option<f64>) -> String {
    match s {
        None => "–".into(),
        Some(s) if s.is_infinite() => "> 1 s".into(),
        Some(s) if s < 1.0 => format!("{:.2} ms", s * 1000.0),
        Some(s) => format!("{s:.1} s"),
    }
}

/// One node as the view shows it.
struct Node {
    url: String,
    before: Option<(Instant, Reading)>,
    figures: Option<Figures>,
    reading: Option<Reading>,
    error: Option<String>,
}

/// The body of `GET url`, whatever its status (`/readyz` answers 503 with the reasons).
async fn fetch(client: &OpsClient, url: &str) -> anyhow::Result<String> {
    Ok(scrape::get(client, url).await?.1)
}

async fn read(client: &OpsClient, base: &str) -> anyhow::Result<Reading> {
    let base = base.trim_end_matches('/');
    let mut reading = Reading::parse(&fetch(client, &format!("{base}/metrics")).await?);
    if let Ok(ready) = fetch(client, &format!("{base}/readyz")).await
        && let Ok(json) = serde_json::from_str::<serde_json::Value>(&ready)
    {
        reading.ready = json["ready"].as_bool();
        reading.reasons = json["failing"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|f| {
                format!(
                    "{}: {}",
                    f["part"].as_str().unwrap_or("?"),
                    f["reason"].as_str().unwrap_or("?")
                )
            })
            .collect();
    }
    Ok(reading)
}

async fn refresh(client: &OpsClient, nodes: &mut [Node]) {
    for node in nodes.iter_mut() {
        match read(client, &node.url).await {
            Ok(reading) => {
                let now = Instant::now();
                if let Some((at, before)) = &node.before {
                    node.figures = Some(Figures::between(
                        &reading,
                        before,
                        now.duration_since(*at).as_secs_f64(),
                    ));
                }
                node.before = Some((now, reading.clone()));
                node.reading = Some(reading);
                node.error = None;
            }
            Err(e) => node.error = Some(format!("{e:#}")),
        }
    }
}

fn status(node: &Node) -> (String, Color) {
    match (&node.error, node.reading.as_ref().and_then(|r| r.ready)) {
        (Some(e), _) => (format!("unreachable ({e})"), Color::Red),
        (None, Some(true)) => ("ready".into(), Color::Green),
        (None, Some(false)) => (
            format!(
                "NOT READY: {}",
                node.reading
                    .as_ref()
                    .map(|r| r.reasons.join("; "))
                    .unwrap_or_default()
            ),
            Color::Red,
        ),
        (None, None) => ("…".into(), Color::Gray),
    }
}

fn row_of(node: &Node) -> Vec<String> {
    let f = node.figures.as_ref();
    let n = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.0}"));
    vec![
        node.url.clone(),
        n(f.map(|f| f.taps_per_s)),
        n(f.map(|f| f.approved_per_s)),
        n(f.map(|f| f.denied_per_s)),
        n(f.map(|f| f.busy_per_s)),
        f.map_or("–".into(), |f| duration(f.p50_s)),
        f.map_or("–".into(), |f| duration(f.p99_s)),
        n(f.map(|f| f.gates)),
        n(f.and_then(|f| f.deny_version)),
        n(f.map(|f| f.settled_per_s)),
        n(f.map(|f| f.backlog)),
    ]
}

const HEADER: [&str; 11] = [
    "node",
    "taps/s",
    "approve/s",
    "deny/s",
    "busy/s",
    "p50",
    "p99",
    "gates",
    "deny list",
    "settled/s",
    "backlog",
];

fn draw(frame: &mut Frame, nodes: &[Node]) {
    let [title, table, modes, health] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(nodes.len() as u16 + 3),
        Constraint::Length(nodes.len() as u16 + 3),
        Constraint::Min(3),
    ])
    .areas(frame.area());
    frame.render_widget(
        Line::from("tapgate top — answers per second, answer time inside the gateway; q quits"),
        title,
    );
    let widths = [Constraint::Min(24)].into_iter().chain(std::iter::repeat_n(
        Constraint::Length(10),
        HEADER.len() - 1,
    ));
    frame.render_widget(
        Table::new(nodes.iter().map(|n| Row::new(row_of(n))), widths)
            .header(Row::new(HEADER).style(Style::new().fg(Color::Yellow)))
            .block(Block::bordered().title("nodes")),
        table,
    );
    let mode_rows = nodes.iter().map(|n| {
        let mut cells = vec![n.url.clone()];
        cells.extend(MODES.iter().map(|m| {
            n.figures
                .as_ref()
                .and_then(|f| f.modes.iter().find(|(x, _)| x == m))
                .map_or("–".into(), |(_, v)| format!("{v:.0}"))
        }));
        Row::new(cells)
    });
    let mode_widths = [Constraint::Min(24)]
        .into_iter()
        .chain(std::iter::repeat_n(Constraint::Length(15), 5));
    frame.render_widget(
        Table::new(mode_rows, mode_widths)
            .header(
                Row::new(std::iter::once("taps/s by mode").chain(MODES))
                    .style(Style::new().fg(Color::Yellow)),
            )
            .block(Block::bordered().title("modes")),
        modes,
    );
    let lines: Vec<Line> = nodes
        .iter()
        .map(|n| {
            let (text, color) = status(n);
            Line::styled(format!("{}: {text}", n.url), Style::new().fg(color))
        })
        .collect();
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title("readiness")),
        health,
    );
}

fn text_report(nodes: &[Node]) -> String {
    let mut out = HEADER.join("\t") + "\n";
    for node in nodes {
        out += &(row_of(node).join("\t") + "\n");
    }
    for node in nodes {
        out += &format!("{}: {}\n", node.url, status(node).0);
    }
    out
}

pub(crate) fn run(args: TopArgs) -> anyhow::Result<()> {
    let runtime = crate::runtime()?;
    let client = scrape::ops_client();
    let mut nodes: Vec<Node> = args
        .urls
        .iter()
        .map(|url| Node {
            url: url.clone(),
            before: None,
            figures: None,
            reading: None,
            error: None,
        })
        .collect();
    if args.once {
        runtime.block_on(async {
            refresh(&client, &mut nodes).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            refresh(&client, &mut nodes).await;
        });
        print!("{}", text_report(&nodes));
        return Ok(());
    }
    let mut terminal = ratatui::init();
    let result = runtime.block_on(async {
        loop {
            refresh(&client, &mut nodes).await;
            terminal.draw(|frame| draw(frame, &nodes))?;
            let deadline = Instant::now() + Duration::from_secs(1);
            while Instant::now() < deadline {
                let wait = deadline.saturating_duration_since(Instant::now());
                if ratatui::crossterm::event::poll(wait)?
                    && let ratatui::crossterm::event::Event::Key(key) =
                        ratatui::crossterm::event::read()?
                {
                    use ratatui::crossterm::event::{KeyCode, KeyModifiers};
                    let quit = key.code == KeyCode::Char('q')
                        || (key.code == KeyCode::Char('c')
                            && key.modifiers.contains(KeyModifiers::CONTROL));
                    if quit {
                        return Ok(());
                    }
                }
            }
        }
    });
    ratatui::restore();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    const BEFORE: &str = "\
tapgate_answers_total{outcome=\"approve\"} 100
tapgate_answers_total{outcome=\"deny\"} 10
tapgate_answers_total{outcome=\"busy\"} 0
tapgate_mode_answers_total{mode=\"bus\",outcome=\"approve\"} 100
tapgate_answer_latency_seconds_bucket{le=\"0.0005\"} 50
tapgate_answer_latency_seconds_bucket{le=\"0.001\"} 100
tapgate_answer_latency_seconds_bucket{le=\"+Inf\"} 110
tapgate_gates_connected{mode=\"bus\"} 4
";
    const NOW: &str = "\
tapgate_answers_total{outcome=\"approve\"} 280
tapgate_answers_total{outcome=\"deny\"} 30
tapgate_answers_total{outcome=\"busy\"} 0
tapgate_mode_answers_total{mode=\"bus\",outcome=\"approve\"} 280
tapgate_answer_latency_seconds_bucket{le=\"0.0005\"} 150
tapgate_answer_latency_seconds_bucket{le=\"0.001\"} 298
tapgate_answer_latency_seconds_bucket{le=\"+Inf\"} 310
tapgate_gates_connected{mode=\"bus\"} 5
tapgate_deny_list_version 1709
";

    #[test]
    fn figures_are_rates_and_quantiles_of_what_changed() {
        let f = Figures::between(&Reading::parse(NOW), &Reading::parse(BEFORE), 2.0);
        assert_eq!(f.taps_per_s, 100.0);
        assert_eq!((f.approved_per_s, f.denied_per_s), (90.0, 10.0));
        // 200 answers in the interval: 100 under 0.5 ms, 198 under 1 ms.
        assert_eq!(f.p50_s, Some(0.0005));
        assert_eq!(f.p99_s, Some(0.001));
        assert_eq!(f.gates, 5.0);
        assert_eq!(f.deny_version, Some(1709.0));
        let settler = Figures::between(&Reading::parse(""), &Reading::parse(""), 2.0);
        assert_eq!(settler.deny_version, None);
        assert_eq!(f.modes[0], ("bus", 90.0));
    }

    #[test]
    fn the_terminal_view_shows_the_figures_of_every_node() {
        let mut ready = Reading::parse(NOW);
        ready.ready = Some(false);
        ready.reasons = vec!["directory: NOAUTH".into()];
        let nodes = [
            Node {
                url: "http://gw1:9433".into(),
                before: None,
                figures: Some(Figures::between(
                    &Reading::parse(NOW),
                    &Reading::parse(BEFORE),
                    2.0,
                )),
                reading: Some(ready),
                error: None,
            },
            Node {
                url: "http://gw2:9433".into(),
                before: None,
                figures: None,
                reading: None,
                error: Some("connection refused".into()),
            },
        ];
        let mut terminal = Terminal::new(TestBackend::new(140, 20)).unwrap();
        terminal.draw(|frame| draw(frame, &nodes)).unwrap();
        let screen: String = terminal
            .backend()
            .buffer()
            .content()
            .iter()
            .map(|c| c.symbol())
            .collect();
        for shown in [
            "http://gw1:9433",
            "100",
            "0.50 ms",
            "1.00 ms",
            "1709",
            "NOT READY: directory: NOAUTH",
            "unreachable",
        ] {
            assert!(
                screen.contains(shown),
                "`{shown}` not on the screen:\n{screen}"
            );
        }
    }
}
