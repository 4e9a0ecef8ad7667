//! The arena: a top-down shooter simulated at a fixed tick. Pure state and rules, no I/O —
//! [`crate::server`] feeds it inputs and connection changes and sends its snapshots.
//!
//! Rules (constants in [`berth_protocol::game`]): players move in the direction of their last
//! input and collide with walls and each other; `fire` shoots toward `aim`; a shot that reaches
//! an opponent costs it hit points, and a kill scores one point for the shooter's team; the dead
//! respawn in their team's third of the map. The game ends at the score limit, at the time
//! limit, when a side surrenders or forfeits (every player gone past the rejoin grace), or as
//! abandoned when nobody is connected for long enough.

use berth_protocol::game::{
    reason, GameParams, GameResults, MapView, PlayerResult, PlayerView, ShotView, Snapshot,
    FIRE_COOLDOWN_MS, MAX_HP, PLAYER_RADIUS, PLAYER_SPEED, RESPAWN_MS, SHOT_DAMAGE, SHOT_LIFE_MS,
    SHOT_SPEED,
};
use berth_protocol::PlayerId;

/// xorshift64*: small, seeded from the identity.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x2545_f491_4f6c_dd1d | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// A tile map: `walls[y][x]`.
#[derive(Debug, Clone)]
pub struct Map {
    pub name: String,
    pub width: usize,
    pub height: usize,
    walls: Vec<Vec<bool>>,
}

impl Map {
    /// Parses `#`/`.` rows; anything but `.` is a wall, and the border is always wall.
    pub fn parse(name: &str, text: &str) -> Option<Self> {
        let rows: Vec<&str> = text
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.is_empty())
            .collect();
        let width = rows.iter().map(|r| r.len()).max()?;
        let height = rows.len();
        if width < 3 || height < 3 {
            return None;
        }
        let walls = (0..height)
            .map(|y| {
                (0..width)
                    .map(|x| {
                        let border = x == 0 || y == 0 || x + 1 == width || y + 1 == height;
                        border || rows[y].as_bytes().get(x) != Some(&b'.')
                    })
                    .collect()
            })
            .collect();
        Some(Self {
            name: name.to_owned(),
            width,
            height,
            walls,
        })
    }

    pub fn wall(&self, x: i64, y: i64) -> bool {
        if x < 0 || y < 0 || x as usize >= self.width || y as usize >= self.height {
            return true;
        }
        self.walls[y as usize][x as usize]
    }

    /// True when a circle of `r` at (`x`, `y`) overlaps a wall tile.
    fn blocked(&self, x: f32, y: f32, r: f32) -> bool {
        let (x0, x1) = ((x - r).floor() as i64, (x + r).floor() as i64);
        let (y0, y1) = ((y - r).floor() as i64, (y + r).floor() as i64);
        for ty in y0..=y1 {
            for tx in x0..=x1 {
                if !self.wall(tx, ty) {
                    continue;
                }
                // Closest point of the tile to the centre.
                let cx = x.clamp(tx as f32, tx as f32 + 1.0);
                let cy = y.clamp(ty as f32, ty as f32 + 1.0);
                if (cx - x).powi(2) + (cy - y).powi(2) < r * r {
                    return true;
                }
            }
        }
        false
    }

    pub fn floor_tiles(&self) -> u64 {
        self.walls.iter().flatten().filter(|w| !**w).count() as u64
    }

    pub fn view(&self) -> MapView {
        MapView {
            name: self.name.clone(),
            width: self.width as u32,
            height: self.height as u32,
            rows: self
                .walls
                .iter()
                .map(|row| row.iter().map(|w| if *w { '#' } else { '.' }).collect())
                .collect(),
        }
    }
}

/// One player's controls, as last sent.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Input {
    pub dx: f32,
    pub dy: f32,
    pub fire: bool,
    pub aim: f32,
}

impl Input {
    /// Clamps each axis to [-1, 1], normalises longer vectors, and drops non-finite values.
    pub fn sanitised(self) -> Self {
        let f = |v: f32| {
            if v.is_finite() {
                v.clamp(-1.0, 1.0)
            } else {
                0.0
            }
        };
        let (mut dx, mut dy) = (f(self.dx), f(self.dy));
        let len = (dx * dx + dy * dy).sqrt();
        if len > 1.0 {
            dx /= len;
            dy /= len;
        }
        let aim = if self.aim.is_finite() { self.aim } else { 0.0 };
        Self {
            dx,
            dy,
            fire: self.fire,
            aim,
        }
    }
}

#[derive(Debug, Clone)]
struct Player {
    id: PlayerId,
    team: u32,
    x: f32,
    y: f32,
    hp: u8,
    alive: bool,
    respawn_at_ms: u64,
    next_fire_ms: u64,
    input: Input,
    kills: u32,
    deaths: u32,
    joined: bool,
    connected: bool,
    /// Game time at which the player dropped (while not connected and not left).
    away_since_ms: Option<u64>,
    surrendered: bool,
    left: bool,
}

#[derive(Debug, Clone)]
struct Shot {
    x: f32,
    y: f32,
    dx: f32,
    dy: f32,
    team: u32,
    shooter: usize,
    expires_ms: u64,
}

/// How a game ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub reason: &'static str,
    pub results: GameResults,
}

/// The whole game state. Time is the game's own clock: milliseconds since the start.
#[derive(Debug)]
pub struct Arena {
    pub params: GameParams,
    pub map: Map,
    teams: Vec<Vec<PlayerId>>,
    players: Vec<Player>,
    shots: Vec<Shot>,
    scores: Vec<u32>,
    rng: Rng,
    pub tick: u64,
    pub now_ms: u64,
    /// Game time since which nobody has been connected.
    empty_since_ms: Option<u64>,
    outcome: Option<Outcome>,
}

impl Arena {
    /// `teams` as matched; when empty, every player is a team of its own.
    pub fn new(
        params: GameParams,
        map: Map,
        players: &[PlayerId],
        teams: &[Vec<PlayerId>],
        seed: u64,
    ) -> Self {
        let teams: Vec<Vec<PlayerId>> = if teams.is_empty() {
            players.iter().map(|p| vec![p.clone()]).collect()
        } else {
            teams.to_vec()
        };
        let team_of = |p: &PlayerId| {
            teams
                .iter()
                .position(|t| t.contains(p))
                .unwrap_or(teams.len().saturating_sub(1)) as u32
        };
        let mut all: Vec<PlayerId> = teams.iter().flatten().cloned().collect();
        for p in players {
            if !all.contains(p) {
                all.push(p.clone());
            }
        }
        let players = all
            .iter()
            .map(|id| Player {
                id: id.clone(),
                team: team_of(id),
                x: 0.0,
                y: 0.0,
                hp: MAX_HP,
                alive: false,
                respawn_at_ms: 0,
                next_fire_ms: 0,
                input: Input::default(),
                kills: 0,
                deaths: 0,
                joined: false,
                connected: false,
                // Not here yet: a player who never comes forfeits after the rejoin grace.
                away_since_ms: Some(0),
                surrendered: false,
                left: false,
            })
            .collect();
        Self {
            scores: vec![0; teams.len().max(1)],
            teams,
            players,
            shots: Vec::new(),
            rng: Rng::new(seed),
            tick: 0,
            now_ms: 0,
            empty_since_ms: Some(0),
            outcome: None,
            params,
            map,
        }
    }

    pub fn teams(&self) -> &[Vec<PlayerId>] {
        &self.teams
    }

    pub fn team_of(&self, player: &PlayerId) -> Option<u32> {
        self.find(player).map(|i| self.players[i].team)
    }

    fn find(&self, player: &PlayerId) -> Option<usize> {
        self.players.iter().position(|p| &p.id == player)
    }

    pub fn is_player(&self, player: &PlayerId) -> bool {
        self.find(player).is_some()
    }

    pub fn has_left(&self, player: &PlayerId) -> bool {
        self.find(player).is_some_and(|i| self.players[i].left)
    }

    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    pub fn time_left_ms(&self) -> u64 {
        (self.params.time_limit_s * 1000).saturating_sub(self.now_ms)
    }

    /// A player connected (first join or rejoin). Returns true for a rejoin.
    pub fn connect(&mut self, player: &PlayerId) -> bool {
        let Some(i) = self.find(player) else {
            return false;
        };
        let rejoined = self.players[i].joined;
        if !rejoined {
            self.spawn(i);
        }
        let p = &mut self.players[i];
        p.joined = true;
        p.connected = true;
        p.away_since_ms = None;
        self.empty_since_ms = None;
        rejoined
    }

    /// A player's connection went away; it keeps its place for the rejoin grace.
    pub fn disconnect(&mut self, player: &PlayerId) {
        if let Some(i) = self.find(player) {
            let now = self.now_ms;
            let p = &mut self.players[i];
            p.connected = false;
            p.input = Input::default();
            if !p.left {
                p.away_since_ms = Some(now);
            }
        }
        if !self.players.iter().any(|p| p.connected) && self.empty_since_ms.is_none() {
            self.empty_since_ms = Some(self.now_ms);
        }
        self.check_sides();
    }

    /// The player leaves for good.
    pub fn leave(&mut self, player: &PlayerId) {
        if let Some(i) = self.find(player) {
            let p = &mut self.players[i];
            p.left = true;
            p.alive = false;
            p.away_since_ms = None;
        }
        self.disconnect(player);
    }

    pub fn surrender(&mut self, player: &PlayerId) {
        if let Some(i) = self.find(player) {
            self.players[i].surrendered = true;
        }
        self.check_sides();
    }

    pub fn input(&mut self, player: &PlayerId, input: Input) {
        if let Some(i) = self.find(player) {
            if self.players[i].connected {
                self.players[i].input = input.sanitised();
            }
        }
    }

    /// A random floor tile in the team's part of the map (thirds for two teams), away from
    /// living opponents when possible.
    fn spawn(&mut self, i: usize) {
        let team = self.players[i].team as usize;
        let teams = self.teams.len().max(1);
        let band = self.map.width as f32 / teams as f32;
        let (lo, hi) = (band * team as f32, band * (team as f32 + 1.0));
        let mut best = (1.5, 1.5, f32::MIN);
        for _ in 0..40 {
            let x = lo + (self.rng.next_u64() % 10_000) as f32 / 10_000.0 * (hi - lo);
            let y = (self.rng.next_u64() % 10_000) as f32 / 10_000.0 * self.map.height as f32;
            let (x, y) = (x.floor() + 0.5, y.floor() + 0.5);
            if self.map.blocked(x, y, PLAYER_RADIUS) {
                continue;
            }
            let nearest = self
                .players
                .iter()
                .filter(|o| o.alive && o.team as usize != team)
                .map(|o| (o.x - x).powi(2) + (o.y - y).powi(2))
                .fold(f32::MAX, f32::min);
            if nearest > best.2 {
                best = (x, y, nearest);
            }
            if nearest > 64.0 {
                break;
            }
        }
        let p = &mut self.players[i];
        p.x = best.0;
        p.y = best.1;
        p.hp = MAX_HP;
        p.alive = true;
    }

    /// Advances the game by one tick of `dt_ms`.
    pub fn step(&mut self, dt_ms: u64) {
        if self.outcome.is_some() {
            return;
        }
        self.tick += 1;
        self.now_ms += dt_ms;
        let now = self.now_ms;
        let dt = dt_ms as f32 / 1000.0;
        // Respawns and the rejoin grace.
        let grace = self.params.rejoin_grace_s * 1000;
        for i in 0..self.players.len() {
            let p = &self.players[i];
            if p.joined && !p.alive && !p.left && now >= p.respawn_at_ms {
                self.spawn(i);
            }
            let p = &mut self.players[i];
            if p.away_since_ms
                .is_some_and(|t| now.saturating_sub(t) >= grace)
            {
                p.left = true;
                p.alive = false;
                p.away_since_ms = None;
            }
        }
        self.move_players(dt);
        self.fire(now);
        self.move_shots(dt, now);
        self.check_end();
    }

    fn move_players(&mut self, dt: f32) {
        for i in 0..self.players.len() {
            let p = &self.players[i];
            if !p.alive {
                continue;
            }
            let (mx, my) = (
                p.input.dx * PLAYER_SPEED * dt,
                p.input.dy * PLAYER_SPEED * dt,
            );
            // Each axis on its own, so players slide along walls; a blocked move is halved a
            // few times, so players get right up to a wall.
            let (mut x, mut y) = (p.x, p.y);
            let mut step = mx;
            for _ in 0..5 {
                if !self.map.blocked(x + step, y, PLAYER_RADIUS) {
                    x += step;
                    break;
                }
                step /= 2.0;
            }
            let mut step = my;
            for _ in 0..5 {
                if !self.map.blocked(x, y + step, PLAYER_RADIUS) {
                    y += step;
                    break;
                }
                step /= 2.0;
            }
            self.players[i].x = x;
            self.players[i].y = y;
        }
        // Players push each other apart (half each), never into a wall.
        for i in 0..self.players.len() {
            for j in i + 1..self.players.len() {
                let (a, b) = (&self.players[i], &self.players[j]);
                if !a.alive || !b.alive {
                    continue;
                }
                let (dx, dy) = (b.x - a.x, b.y - a.y);
                let d = (dx * dx + dy * dy).sqrt();
                let min = 2.0 * PLAYER_RADIUS;
                if d >= min || d < 1e-4 {
                    continue;
                }
                let push = (min - d) / 2.0;
                let (ux, uy) = (dx / d * push, dy / d * push);
                for (k, sign) in [(i, -1.0), (j, 1.0)] {
                    let p = &self.players[k];
                    let (x, y) = (p.x + sign * ux, p.y + sign * uy);
                    if !self.map.blocked(x, y, PLAYER_RADIUS) {
                        self.players[k].x = x;
                        self.players[k].y = y;
                    }
                }
            }
        }
    }

    fn fire(&mut self, now: u64) {
        for (i, p) in self.players.iter_mut().enumerate() {
            if !p.alive || !p.input.fire || now < p.next_fire_ms {
                continue;
            }
            p.next_fire_ms = now + FIRE_COOLDOWN_MS;
            let (dx, dy) = (p.input.aim.cos(), p.input.aim.sin());
            let start = PLAYER_RADIUS + 0.05;
            self.shots.push(Shot {
                x: p.x + dx * start,
                y: p.y + dy * start,
                dx,
                dy,
                team: p.team,
                shooter: i,
                expires_ms: now + SHOT_LIFE_MS,
            });
        }
    }

    fn move_shots(&mut self, dt: f32, now: u64) {
        // Sub-steps of at most a third of a tile, so shots neither tunnel nor skip players.
        let travel = SHOT_SPEED * dt;
        let steps = (travel / 0.33).ceil().max(1.0) as usize;
        let step = travel / steps as f32;
        let mut kept = Vec::with_capacity(self.shots.len());
        'shots: for mut s in std::mem::take(&mut self.shots) {
            if now >= s.expires_ms {
                continue;
            }
            for _ in 0..steps {
                s.x += s.dx * step;
                s.y += s.dy * step;
                if self.map.wall(s.x.floor() as i64, s.y.floor() as i64) {
                    continue 'shots;
                }
                let hit = self.players.iter().position(|p| {
                    p.alive
                        && p.team != s.team
                        && (p.x - s.x).powi(2) + (p.y - s.y).powi(2) < PLAYER_RADIUS.powi(2)
                });
                if let Some(v) = hit {
                    self.hit(v, s.shooter, now);
                    continue 'shots;
                }
            }
            kept.push(s);
        }
        self.shots = kept;
    }

    fn hit(&mut self, victim: usize, shooter: usize, now: u64) {
        let v = &mut self.players[victim];
        v.hp = v.hp.saturating_sub(SHOT_DAMAGE);
        if v.hp > 0 {
            return;
        }
        v.alive = false;
        v.deaths += 1;
        v.respawn_at_ms = now + RESPAWN_MS;
        let team = self.players[shooter].team as usize;
        self.players[shooter].kills += 1;
        if let Some(s) = self.scores.get_mut(team) {
            *s += 1;
        }
    }

    /// Sides still in the game: a team is out when all its players left, or when every one
    /// of its players still here (connected, or within the grace) surrendered.
    fn check_sides(&mut self) {
        // A session without players has no sides: only the abandon timer ends it.
        if self.outcome.is_some() || self.players.is_empty() {
            return;
        }
        let teams = self.scores.len() as u32;
        let mut standing = Vec::new();
        let mut surrendered = false;
        for t in 0..teams {
            let members: Vec<&Player> = self.players.iter().filter(|p| p.team == t).collect();
            let present: Vec<&&Player> = members.iter().filter(|p| !p.left).collect();
            if present.is_empty() {
                continue;
            }
            if present.iter().all(|p| p.surrendered) {
                surrendered = true;
                continue;
            }
            standing.push(t);
        }
        match standing.as_slice() {
            [] => self.finish(reason::ABANDONED, None),
            // Conceding hands the win to the other side, even one that has not come yet.
            [team] if teams > 1 && surrendered => self.finish(reason::SURRENDER, Some(*team)),
            [team] if teams > 1 => {
                // Everyone else left: a side that never showed up wins nothing.
                if self.players.iter().any(|p| p.team == *team && p.joined) {
                    self.finish(reason::FORFEIT, Some(*team));
                } else {
                    self.finish(reason::ABANDONED, None);
                }
            }
            _ => {}
        }
    }

    fn check_end(&mut self) {
        if let Some(t) = self
            .scores
            .iter()
            .position(|s| *s >= self.params.score_limit)
        {
            return self.finish(reason::SCORE_LIMIT, Some(t as u32));
        }
        if self.now_ms >= self.params.time_limit_s * 1000 {
            let best = self.scores.iter().copied().max().unwrap_or(0);
            let leaders: Vec<usize> = (0..self.scores.len())
                .filter(|t| self.scores[*t] == best)
                .collect();
            let winner = (leaders.len() == 1).then(|| leaders[0] as u32);
            return self.finish(reason::TIME_LIMIT, winner);
        }
        if self
            .empty_since_ms
            .is_some_and(|t| self.now_ms.saturating_sub(t) >= self.params.abandon_after_s * 1000)
        {
            return self.finish(reason::ABANDONED, None);
        }
        self.check_sides();
    }

    fn finish(&mut self, why: &'static str, winner: Option<u32>) {
        self.shots.clear();
        self.outcome = Some(Outcome {
            reason: why,
            results: GameResults {
                winner,
                scores: self.scores.clone(),
                players: self
                    .players
                    .iter()
                    .map(|p| PlayerResult {
                        id: p.id.clone(),
                        team: p.team,
                        kills: p.kills,
                        deaths: p.deaths,
                        joined: p.joined,
                        left: p.left,
                    })
                    .collect(),
                map: self.map.name.clone(),
                duration_ms: self.now_ms,
                ticks: self.tick,
            },
        });
    }

    /// The world as `player`'s connection sees it (`ack` = its last applied input).
    pub fn snapshot(&self, clock_ms: u64, ack: u32) -> Snapshot {
        Snapshot {
            tick: self.tick,
            clock_ms,
            time_left_ms: self.time_left_ms(),
            scores: self.scores.clone(),
            players: self
                .players
                .iter()
                .filter(|p| p.joined)
                .map(|p| PlayerView {
                    id: p.id.clone(),
                    team: p.team,
                    x: (p.x * 100.0).round() / 100.0,
                    y: (p.y * 100.0).round() / 100.0,
                    hp: p.hp,
                    alive: p.alive,
                    connected: p.connected,
                    kills: p.kills,
                    deaths: p.deaths,
                })
                .collect(),
            shots: self
                .shots
                .iter()
                .map(|s| ShotView {
                    x: (s.x * 100.0).round() / 100.0,
                    y: (s.y * 100.0).round() / 100.0,
                    dx: s.dx,
                    dy: s.dy,
                    team: s.team,
                })
                .collect(),
            ack,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> PlayerId {
        PlayerId::new(s).expect("id")
    }

    /// An open 20×7 room.
    fn room() -> Map {
        let mut rows = vec!["#".repeat(20)];
        for _ in 0..5 {
            rows.push(format!("#{}#", ".".repeat(18)));
        }
        rows.push("#".repeat(20));
        Map::parse("room", &rows.join("\n")).expect("map")
    }

    fn duel(params: GameParams) -> Arena {
        let (a, b) = (id("alice"), id("bob"));
        Arena::new(
            params,
            room(),
            &[a.clone(), b.clone()],
            &[vec![a], vec![b]],
            7,
        )
    }

    fn place(arena: &mut Arena, who: &str, x: f32, y: f32) {
        let i = arena.find(&id(who)).expect("player");
        arena.players[i].x = x;
        arena.players[i].y = y;
    }

    #[test]
    fn maps_parse_with_a_closed_border() {
        let m = Map::parse("m", "....\n....\n....").expect("map");
        assert!(m.wall(0, 1) && m.wall(3, 1) && m.wall(1, 0) && m.wall(1, 2));
        assert!(!m.wall(1, 1) && !m.wall(2, 1));
        assert!(m.wall(-1, 1) && m.wall(9, 9));
        assert_eq!(m.floor_tiles(), 2);
        assert!(Map::parse("m", "..").is_none());
        assert_eq!(m.view().rows, vec!["####", "#..#", "####"]);
    }

    #[test]
    fn players_spawn_on_their_side_and_walls_stop_them() {
        let mut a = duel(GameParams::default());
        a.connect(&id("alice"));
        a.connect(&id("bob"));
        let s = a.snapshot(0, 0);
        assert!(
            s.players[0].x < 10.0,
            "team 0 spawns left: {:?}",
            s.players[0]
        );
        assert!(
            s.players[1].x > 10.0,
            "team 1 spawns right: {:?}",
            s.players[1]
        );
        place(&mut a, "alice", 1.5, 3.5);
        a.input(
            &id("alice"),
            Input {
                dx: -1.0,
                ..Input::default()
            },
        );
        for _ in 0..20 {
            a.step(50);
        }
        let x = a.snapshot(0, 0).players[0].x;
        assert!((1.3..1.5).contains(&x), "stopped by the wall at x={x}");
    }

    #[test]
    fn inputs_are_sanitised() {
        let i = Input {
            dx: 5.0,
            dy: 5.0,
            fire: true,
            aim: f32::NAN,
        }
        .sanitised();
        assert!(((i.dx * i.dx + i.dy * i.dy).sqrt() - 1.0).abs() < 1e-4);
        assert_eq!(i.aim, 0.0);
        let i = Input {
            dx: f32::INFINITY,
            ..Input::default()
        }
        .sanitised();
        assert_eq!(i.dx, 0.0);
    }

    #[test]
    fn shots_kill_and_score_until_the_limit() {
        let mut a = duel(GameParams {
            score_limit: 2,
            ..GameParams::default()
        });
        a.connect(&id("alice"));
        a.connect(&id("bob"));
        for _ in 0..400 {
            place(&mut a, "alice", 3.5, 3.5);
            place(&mut a, "bob", 8.5, 3.5);
            a.input(
                &id("alice"),
                Input {
                    fire: true,
                    aim: 0.0,
                    ..Input::default()
                },
            );
            a.step(50);
            if a.outcome().is_some() {
                break;
            }
        }
        let o = a.outcome().expect("game over");
        assert_eq!(o.reason, reason::SCORE_LIMIT);
        assert_eq!(o.results.winner, Some(0));
        assert_eq!(o.results.scores, vec![2, 0]);
        assert_eq!(o.results.players[0].kills, 2);
        assert_eq!(o.results.players[1].deaths, 2);
        // Four hits per kill, a shot every 250 ms, respawn 2 s: well under 400 ticks.
        assert!(o.results.ticks < 200, "{}", o.results.ticks);
    }

    #[test]
    fn time_limit_and_draws() {
        let mut a = duel(GameParams {
            time_limit_s: 1,
            ..GameParams::default()
        });
        a.connect(&id("alice"));
        a.connect(&id("bob"));
        for _ in 0..20 {
            a.step(50);
        }
        let o = a.outcome().expect("over");
        assert_eq!((o.reason, o.results.winner), (reason::TIME_LIMIT, None));
        assert_eq!(o.results.duration_ms, 1000);
    }

    #[test]
    fn surrender_and_forfeit_hand_the_win_to_the_other_side() {
        let mut a = duel(GameParams::default());
        a.connect(&id("alice"));
        a.connect(&id("bob"));
        a.surrender(&id("bob"));
        let o = a.outcome().expect("over");
        assert_eq!((o.reason, o.results.winner), (reason::SURRENDER, Some(0)));

        let mut a = duel(GameParams::default());
        a.connect(&id("alice"));
        a.connect(&id("bob"));
        a.leave(&id("alice"));
        let o = a.outcome().expect("over");
        assert_eq!((o.reason, o.results.winner), (reason::FORFEIT, Some(1)));
        assert!(o.results.players[0].left);
    }

    #[test]
    fn a_dropped_player_may_rejoin_within_the_grace_and_not_after() {
        let mut a = duel(GameParams {
            rejoin_grace_s: 1,
            ..GameParams::default()
        });
        a.connect(&id("alice"));
        a.connect(&id("bob"));
        a.disconnect(&id("bob"));
        for _ in 0..10 {
            a.step(50);
        }
        assert!(a.outcome().is_none());
        assert!(a.connect(&id("bob")), "a rejoin");
        a.disconnect(&id("bob"));
        for _ in 0..21 {
            a.step(50);
        }
        assert!(a.has_left(&id("bob")));
        let o = a.outcome().expect("bob forfeited");
        assert_eq!((o.reason, o.results.winner), (reason::FORFEIT, Some(0)));
    }

    #[test]
    fn nobody_connected_is_abandoned() {
        let mut a = duel(GameParams {
            abandon_after_s: 1,
            ..GameParams::default()
        });
        for _ in 0..20 {
            a.step(50);
        }
        let o = a.outcome().expect("abandoned");
        assert_eq!((o.reason, o.results.winner), (reason::ABANDONED, None));
        assert!(!o.results.players[0].joined);

        // One came and left; the other never came: nobody wins.
        let mut a = duel(GameParams::default());
        a.connect(&id("alice"));
        a.leave(&id("alice"));
        let o = a.outcome().expect("abandoned");
        assert_eq!((o.reason, o.results.winner), (reason::ABANDONED, None));
    }
}
