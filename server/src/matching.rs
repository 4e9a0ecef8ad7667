//! The matching rules, as a pure function over one pool's queue: which tickets form a match
//! now, which have waited too long. The [`crate::matchmaker`] task runs it and claims the
//! result atomically in the store.
//!
//! Rules: parties are taken whole and kept in one team; the oldest waiting unit anchors each
//! match and takes others, oldest first, whose skill is within the anchor's window (which
//! widens with the anchor's wait); a match forms at once when full, or with at least
//! `players.min` once the anchor has waited `fill_wait_ms` — and only if every team has a
//! player (a lone party is not matched against nobody), unless the mode sets `empty_teams`.
//!
//! Players queued with latencies (the mode's `*` pool) are matched the same way in each region
//! the anchor reaches within the latency allowed after its wait (the mode's `[latency]`, which
//! widens like the skill window), taking only units within that latency of the region too; of
//! the regions where a match forms, a full one wins, then the lowest worst latency.

use crate::model::Ticket;
use crate::modes::Mode;
use berth_protocol::play::RegionReason;
use berth_protocol::{PlayerId, RegionRule};
use std::collections::BTreeMap;

/// A match to claim: its tickets and its teams.
#[derive(Debug, Clone, PartialEq)]
pub struct Formed {
    pub tickets: Vec<String>,
    pub teams: Vec<Vec<PlayerId>>,
    /// `enqueued_ms` of the oldest ticket in the match.
    pub oldest_ms: u64,
    /// The region it is played in, and why.
    pub region: String,
    pub reason: RegionReason,
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

    /// The unit's latency to `region`: its slowest member's (`None` if one did not measure
    /// it).
    fn latency(&self, region: &str) -> Option<u32> {
        self.tickets
            .iter()
            .map(|t| t.latencies.as_ref()?.get(region).copied())
            .try_fold(0, |worst, ms| Some(worst.max(ms?)))
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

    let mut used = vec![false; units.len()];
    for anchor in 0..units.len() {
        if used[anchor] {
            continue;
        }
        let waited = now_ms.saturating_sub(units[anchor].oldest_ms);
        let best = regions_for(&units[anchor], mode, waited)
            .into_iter()
            .filter_map(|(region, limit)| group(mode, &units, &used, anchor, waited, region, limit))
            .min_by(|a, b| a.rank().cmp(&b.rank()));
        let Some(best) = best else { continue };
        for &i in &best.picked {
            used[i] = true;
        }
        out.matches.push(Formed {
            tickets: best
                .picked
                .iter()
                .flat_map(|&i| units[i].tickets.iter().map(|t| t.id.clone()))
                .collect(),
            oldest_ms: best
                .picked
                .iter()
                .map(|&i| units[i].oldest_ms)
                .min()
                .unwrap_or(now_ms),
            teams: best.teams,
            region: best.region.to_owned(),
            reason: best.reason,
        });
    }
    out
}

/// The regions a match anchored by `a` may be played in, each with the latency every member
/// must be within there: the pool's own region without a limit for a named queue; for
/// latency-queued players, each region the mode offers that `a` reaches within the latency
/// allowed after its wait.
fn regions_for<'a>(a: &Unit<'a>, mode: &Mode, waited_ms: u64) -> Vec<(&'a str, Option<u32>)> {
    match a.tickets[0].latencies.as_ref() {
        None => vec![(a.tickets[0].pool.region.as_str(), None)],
        Some(latencies) => {
            let allowed = mode.latency.allowed_after(waited_ms);
            latencies
                .keys()
                .filter(|r| mode.offers_region(r))
                .filter(|r| a.latency(r).is_some_and(|ms| ms <= allowed))
                .map(|r| (r.as_str(), Some(allowed)))
                .collect()
        }
    }
}

/// A match that could form around an anchor in one region.
struct Group<'a> {
    picked: Vec<usize>,
    teams: Vec<Vec<PlayerId>>,
    full: bool,
    region: &'a str,
    reason: RegionReason,
}

impl Group<'_> {
    /// Lower is better: a full match first, then the lowest worst latency, then by name.
    fn rank(&self) -> (bool, u32, &str) {
        (!self.full, self.reason.worst_ms.unwrap_or(0), self.region)
    }
}

/// Gathers, around `anchor` and oldest first, the free units within its skill window (and,
/// with a `limit`, within that latency of `region`) into a match, if one can form now.
fn group<'a>(
    mode: &Mode,
    units: &[Unit<'_>],
    used: &[bool],
    anchor: usize,
    waited: u64,
    region: &'a str,
    limit: Option<u32>,
) -> Option<Group<'a>> {
    let team_size = mode.team_size();
    let a = &units[anchor];
    let window = mode.skill.window_after(waited);
    let near = |u: &Unit<'_>| limit.is_none_or(|l| u.latency(region).is_some_and(|ms| ms <= l));
    let mut picked = vec![anchor];
    let mut total = a.size();
    for (i, u) in units.iter().enumerate().skip(anchor + 1) {
        if total == mode.players.max {
            break;
        }
        if used[i]
            || total + u.size() > mode.players.max
            || (u.skill - a.skill).abs() > window
            || !near(u)
        {
            continue;
        }
        picked.push(i);
        total += u.size();
        if teams_for(units, &picked, mode.teams, team_size).is_none() {
            picked.pop();
            total -= u.size();
        }
    }
    let full = total == mode.players.max;
    let enough = total >= mode.players.min && waited >= mode.fill_wait_ms;
    if !(full || enough) {
        return None;
    }
    let teams = teams_for(units, &picked, mode.teams, team_size)?;
    if !mode.empty_teams && teams.iter().any(Vec::is_empty) {
        return None;
    }
    let reason = match limit {
        None => RegionReason::named(),
        Some(allowed) => RegionReason {
            rule: RegionRule::Latency,
            worst_ms: picked
                .iter()
                .filter_map(|&i| units[i].latency(region))
                .max(),
            allowed_ms: Some(allowed),
        },
    };
    Some(Group {
        picked,
        teams,
        full,
        region,
        reason,
    })
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
            latencies: None,
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

    /// A solo ticket in the latency pool with these measured latencies.
    fn tl(id: &str, at: u64, latencies: &[(&str, u32)]) -> Ticket {
        let mut t = t(id, 1000.0, at, None);
        t.pool.region = berth_protocol::play::BY_LATENCY.into();
        t.latencies = Some(
            latencies
                .iter()
                .map(|(r, ms)| (r.to_string(), *ms))
                .collect(),
        );
        t
    }

    #[test]
    fn latency_groups_play_where_their_worst_latency_is_lowest() {
        let m = mode("[players]\nmin=2\nmax=2\n[latency]\nallowed_ms=100\nwiden_per_s=10\nmax_allowed_ms=250\n");
        let q = [
            tl("a", 0, &[("eu", 30), ("us", 90)]),
            tl("b", 1, &[("eu", 80), ("us", 40)]),
        ];
        let o = decide(&m, &q, 10, 30_000);
        assert_eq!(o.matches.len(), 1);
        let f = &o.matches[0];
        // eu: worst 80; us: worst 90.
        assert_eq!(f.region, "eu");
        assert_eq!(f.reason.rule, RegionRule::Latency);
        assert_eq!(
            (f.reason.worst_ms, f.reason.allowed_ms),
            (Some(80), Some(100))
        );
        // A named queue plays in its own region.
        let named = [t("x", 1000.0, 0, None), t("y", 1000.0, 1, None)];
        let o = decide(&m, &named, 10, 30_000);
        assert_eq!(o.matches[0].region, "r");
        assert_eq!(o.matches[0].reason, RegionReason::named());
    }

    #[test]
    fn latency_allowance_widens_with_the_anchors_wait() {
        let m = mode("[players]\nmin=2\nmax=2\n[latency]\nallowed_ms=100\nwiden_per_s=10\nmax_allowed_ms=150\n");
        let q = [
            tl("a", 0, &[("eu", 20), ("us", 170)]),
            tl("b", 0, &[("eu", 140), ("us", 20)]),
        ];
        assert!(
            decide(&m, &q, 3_000, 30_000).matches.is_empty(),
            "130 allowed, eu needs 140"
        );
        let o = decide(&m, &q, 4_000, 30_000);
        assert_eq!(o.matches.len(), 1, "140 allowed after 4 s");
        assert_eq!(o.matches[0].region, "eu");
        assert_eq!(o.matches[0].reason.allowed_ms, Some(140));
        // Capped at max_allowed_ms: a region 200 ms away never qualifies.
        let far = [
            tl("a", 0, &[("eu", 20)]),
            tl("b", 0, &[("eu", 200), ("us", 20)]),
        ];
        assert!(decide(&m, &far, 60_000, 30_000).matches.is_empty());
    }

    #[test]
    fn a_full_match_beats_a_closer_partial_one_and_parties_count_their_slowest() {
        let m = mode("teams=2\nfill_wait_ms=0\n[players]\nmin=2\nmax=4\n");
        let mut q = vec![
            tl("a", 0, &[("eu", 10), ("us", 50)]),
            tl("b", 1, &[("eu", 10), ("us", 50)]),
            tl("c", 2, &[("us", 20)]),
            tl("d", 3, &[("us", 20)]),
        ];
        // eu has only a and b (worst 10); us has all four (worst 50): the full one wins.
        let o = decide(&m, &q, 10, 30_000);
        assert_eq!(o.matches.len(), 1);
        assert_eq!(o.matches[0].region, "us");
        assert_eq!(o.matches[0].tickets.len(), 4);
        // A party's latency to a region is its slowest member's; a member who did not
        // measure a region keeps the party out of it.
        for (i, p) in [("c", 0), ("d", 1)] {
            q[p + 2] = tl(i, 2, &[("us", 20), ("eu", 120)]);
            q[p + 2].party = Some(PartySpec {
                id: "cd".into(),
                size: 2,
            });
        }
        q[3].latencies.as_mut().expect("set").remove("eu");
        let o = decide(&m, &q, 10, 30_000);
        assert_eq!(o.matches[0].region, "us", "{:?}", o.matches[0]);
    }
}
