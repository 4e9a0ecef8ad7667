//! The matching rules, as a pure function over one pool's queue: which tickets form a match
//! now, which have waited too long. The [`crate::matchmaker`] task runs it and claims the
//! result atomically in the store.
//!
//! Rules: parties are taken whole and kept in one team; the oldest waiting unit anchors each
//! match and takes others, oldest first, whose skill is within the anchor's window (which
//! widens with the anchor's wait); a match forms at once when full, or with at least
//! `players.min` once the anchor has waited `fill_wait_ms` — and only if every team has a
//! player (a lone party is not matched against nobody), unless the mode sets `empty_teams`.

use crate::model::Ticket;
use crate::modes::Mode;
use berth_protocol::PlayerId;
use std::collections::BTreeMap;

/// A match to claim: its tickets and its teams.
#[derive(Debug, Clone, PartialEq)]
pub struct Formed {
    pub tickets: Vec<String>,
    pub teams: Vec<Vec<PlayerId>>,
    /// `enqueued_ms` of the oldest ticket in the match.
    pub oldest_ms: u64,
}

/// What one matching pass decided.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    pub matches: Vec<Formed>,
    /// Tickets to drop, with the reason to tell the player.
    pub dropped: Vec<(Ticket, &'static str)>,
}

/// Players who queue together (a lone player is a unit of one).
#[derive(Debug)]
struct Unit<'a> {
    tickets: Vec<&'a Ticket>,
    skill: f64,
    oldest_ms: u64,
}

impl Unit<'_> {
    fn size(&self) -> u32 {
        self.tickets.len() as u32
    }
}

/// Decides one pass over `tickets` (oldest first) for `mode` at `now_ms`. Tickets away longer
/// than `away_grace_ms` are dropped as `away`.
pub fn decide(mode: &Mode, tickets: &[Ticket], now_ms: u64, away_grace_ms: u64) -> Outcome {
    let mut out = Outcome::default();
    let max_wait_ms = mode.max_wait_s * 1000;
    let mut parties: BTreeMap<&str, Vec<&Ticket>> = BTreeMap::new();
    let mut units: Vec<Unit<'_>> = Vec::new();
    for t in tickets {
        if t.away_since_ms
            .is_some_and(|a| now_ms.saturating_sub(a) > away_grace_ms)
        {
            out.dropped.push((t.clone(), "away"));
            continue;
        }
        if now_ms.saturating_sub(t.enqueued_ms) > max_wait_ms {
            out.dropped.push((t.clone(), "max_wait"));
            continue;
        }
        match &t.party {
            Some(p) if p.size > 1 => parties.entry(p.id.as_str()).or_default().push(t),
            _ => units.push(Unit {
                tickets: vec![t],
                skill: t.skill,
                oldest_ms: t.enqueued_ms,
            }),
        }
    }
    for members in parties.into_values() {
        let size = members[0].party.as_ref().map_or(1, |p| p.size) as usize;
        // A party is matchable once all its members have queued.
        if members.len() >= size {
            let members: Vec<&Ticket> = members.into_iter().take(size).collect();
            units.push(Unit {
                skill: members.iter().map(|t| t.skill).sum::<f64>() / size as f64,
                oldest_ms: members
                    .iter()
                    .map(|t| t.enqueued_ms)
                    .min()
                    .unwrap_or(now_ms),
                tickets: members,
            });
        }
    }
    units.sort_by(|a, b| (a.oldest_ms, &a.tickets[0].id).cmp(&(b.oldest_ms, &b.tickets[0].id)));

    let team_size = mode.team_size();
    let mut used = vec![false; units.len()];
    for anchor in 0..units.len() {
        if used[anchor] {
            continue;
        }
        let a = &units[anchor];
        let waited = now_ms.saturating_sub(a.oldest_ms);
        let window = mode.skill.window_after(waited);
        let mut picked = vec![anchor];
        let mut total = a.size();
        for (i, u) in units.iter().enumerate().skip(anchor + 1) {
            if total == mode.players.max {
                break;
            }
            if used[i] || total + u.size() > mode.players.max || (u.skill - a.skill).abs() > window
            {
                continue;
            }
            picked.push(i);
            total += u.size();
            if teams_for(&units, &picked, mode.teams, team_size).is_none() {
                picked.pop();
                total -= u.size();
            }
        }
        let full = total == mode.players.max;
        let enough = total >= mode.players.min && waited >= mode.fill_wait_ms;
        if !(full || enough) {
            continue;
        }
        let Some(teams) = teams_for(&units, &picked, mode.teams, team_size) else {
            continue;
        };
        if !mode.empty_teams && teams.iter().any(Vec::is_empty) {
            continue;
        }
        for &i in &picked {
            used[i] = true;
        }
        out.matches.push(Formed {
            tickets: picked
                .iter()
                .flat_map(|&i| units[i].tickets.iter().map(|t| t.id.clone()))
                .collect(),
            teams,
            oldest_ms: picked
                .iter()
                .map(|&i| units[i].oldest_ms)
                .min()
                .unwrap_or(now_ms),
        });
    }
    out
}

/// Splits the picked units into `teams` teams of at most `team_size`, keeping parties whole
/// and balancing skill: largest units first, each into the team with most room (then the
/// lowest skill total). `None` if they do not fit.
fn teams_for(
    units: &[Unit<'_>],
    picked: &[usize],
    teams: u32,
    team_size: u32,
) -> Option<Vec<Vec<PlayerId>>> {
    let mut order: Vec<usize> = picked.to_vec();
    order.sort_by(|&x, &y| {
        units[y]
            .size()
            .cmp(&units[x].size())
            .then(units[y].skill.total_cmp(&units[x].skill))
    });
    let mut out: Vec<(Vec<PlayerId>, f64)> = vec![(Vec::new(), 0.0); teams as usize];
    for i in order {
        let u = &units[i];
        let (team, _) = out
            .iter_mut()
            .filter(|(t, _)| t.len() as u32 + u.size() <= team_size)
            .map(|t| {
                let room = team_size - t.0.len() as u32;
                let skill = t.1;
                (t, (room, skill))
            })
            .max_by(|(_, (ra, sa)), (_, (rb, sb))| ra.cmp(rb).then(sb.total_cmp(sa)))?;
        team.0.extend(u.tickets.iter().map(|t| t.player.clone()));
        team.1 += u.skill * u.size() as f64;
    }
    Some(out.into_iter().map(|(t, _)| t).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PoolKey;
    use crate::modes::Modes;
    use berth_protocol::play::PartySpec;
    use std::path::Path;

    fn mode(text: &str) -> Mode {
        Modes::parse(
            Path::new("m.toml"),
            &format!("image='a'\n{text}\n[vm]\nmemory_mib=64\n"),
        )
        .expect("valid mode")
    }

    fn t(id: &str, skill: f64, at: u64, party: Option<(&str, u32)>) -> Ticket {
        Ticket {
            id: id.into(),
            player: PlayerId::new(format!("p-{id}")).expect("id"),
            pool: PoolKey {
                mode: "m".into(),
                region: "r".into(),
            },
            party: party.map(|(id, size)| PartySpec {
                id: id.into(),
                size,
            }),
            skill,
            enqueued_ms: at,
            away_since_ms: None,
        }
    }

    #[test]
    fn full_match_forms_at_once_oldest_first() {
        let m = mode("teams=2\n[players]\nmin=2\nmax=2\n");
        let q = [
            t("a", 1000.0, 1, None),
            t("b", 1010.0, 2, None),
            t("c", 990.0, 3, None),
        ];
        let o = decide(&m, &q, 10, 30_000);
        assert_eq!(o.matches.len(), 1);
        assert_eq!(o.matches[0].tickets, vec!["a", "b"]);
        assert_eq!(o.matches[0].teams.len(), 2);
        assert_eq!(o.matches[0].oldest_ms, 1);
    }

    #[test]
    fn skill_window_keeps_apart_then_widens() {
        let m = mode("[players]\nmin=2\nmax=2\n[skill]\nwindow=100.0\nwiden_per_s=100.0\nmax_window=1000.0\n");
        let q = [t("a", 1000.0, 0, None), t("b", 1500.0, 0, None)];
        assert!(
            decide(&m, &q, 1000, 30_000).matches.is_empty(),
            "500 apart at 200 window"
        );
        assert_eq!(
            decide(&m, &q, 4000, 30_000).matches.len(),
            1,
            "window 500 after 4 s"
        );
    }

    #[test]
    fn min_players_start_after_fill_wait() {
        let m = mode("fill_wait_ms=3000\n[players]\nmin=2\nmax=4\n");
        let q = [t("a", 1000.0, 0, None), t("b", 1000.0, 0, None)];
        assert!(decide(&m, &q, 1000, 30_000).matches.is_empty());
        assert_eq!(decide(&m, &q, 3000, 30_000).matches[0].tickets.len(), 2);
    }

    #[test]
    fn parties_are_whole_and_in_one_team() {
        let m = mode("teams=2\n[players]\nmin=4\nmax=4\n");
        let mut q = vec![
            t("a", 1000.0, 0, Some(("p1", 2))),
            t("x", 1000.0, 1, None),
            t("y", 1000.0, 2, None),
        ];
        assert!(
            decide(&m, &q, 10, 30_000).matches.is_empty(),
            "party incomplete"
        );
        q.push(t("b", 1000.0, 3, Some(("p1", 2))));
        let o = decide(&m, &q, 10, 30_000);
        assert_eq!(o.matches.len(), 1);
        let party_team = o.matches[0]
            .teams
            .iter()
            .find(|team| team.iter().any(|p| p.as_str() == "p-a"))
            .expect("a placed");
        assert!(
            party_team.iter().any(|p| p.as_str() == "p-b"),
            "{:?}",
            o.matches[0].teams
        );
    }

    #[test]
    fn a_lone_party_waits_for_opponents() {
        let m = mode("teams=2\nfill_wait_ms=3000\n[players]\nmin=2\nmax=8\n");
        let mut q = vec![
            t("a", 1000.0, 0, Some(("p", 2))),
            t("b", 1000.0, 0, Some(("p", 2))),
        ];
        // Enough players and long past the fill wait, but one team would be empty.
        assert!(decide(&m, &q, 60_000, 30_000).matches.is_empty());
        q.push(t("c", 1000.0, 1, None));
        let o = decide(&m, &q, 60_000, 30_000);
        assert_eq!(o.matches.len(), 1);
        let mut sizes: Vec<usize> = o.matches[0].teams.iter().map(Vec::len).collect();
        sizes.sort();
        assert_eq!(sizes, [1, 2], "{:?}", o.matches[0].teams);
        // A mode that allows empty teams (a co-op run, say) starts the party alone.
        let coop = mode("teams=2\nempty_teams=true\n[players]\nmin=2\nmax=8\n");
        let o = decide(&coop, &q[..2], 60_000, 30_000);
        assert_eq!(o.matches.len(), 1);
        assert!(o.matches[0].teams.iter().any(Vec::is_empty));
    }

    #[test]
    fn party_too_big_for_a_team_never_fits() {
        let m = mode("teams=2\n[players]\nmin=4\nmax=4\n");
        let q = [
            t("a", 1000.0, 0, Some(("p", 3))),
            t("b", 1000.0, 0, Some(("p", 3))),
            t("c", 1000.0, 0, Some(("p", 3))),
            t("d", 1000.0, 1, None),
        ];
        assert!(decide(&m, &q, 10, 30_000).matches.is_empty());
    }

    #[test]
    fn stale_and_away_tickets_are_dropped() {
        let m = mode("max_wait_s=10\n[players]\nmin=2\nmax=2\n");
        let mut away = t("b", 1000.0, 5000, None);
        away.away_since_ms = Some(6000);
        let q = [t("a", 1000.0, 0, None), away];
        let o = decide(&m, &q, 11_000, 2000);
        assert_eq!(
            o.dropped
                .iter()
                .map(|(t, r)| (t.id.as_str(), *r))
                .collect::<Vec<_>>(),
            vec![("a", "max_wait"), ("b", "away")]
        );
        assert!(o.matches.is_empty());
    }

    #[test]
    fn many_matches_in_one_pass() {
        let m = mode("[players]\nmin=2\nmax=2\n");
        let q: Vec<Ticket> = (0..100)
            .map(|i| t(&format!("t{i:03}"), 1000.0, i, None))
            .collect();
        let o = decide(&m, &q, 200, 30_000);
        assert_eq!(o.matches.len(), 50);
        let mut all: Vec<&String> = o.matches.iter().flat_map(|f| &f.tickets).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 100, "each ticket in exactly one match");
    }
}
