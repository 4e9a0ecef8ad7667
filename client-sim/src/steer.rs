//! How a bot plays, as pure functions of the map and the latest state: wander the map steering
//! away from walls, head for the nearest living opponent, aim at it and fire when it is in
//! range and in sight. Coordinates are tiles; angles are radians with 0 along +x and π/2 along
//! +y (down), as in `berth_protocol::game`.

use berth_protocol::game::{MapView, PlayerView, PLAYER_RADIUS, SHOT_LIFE_MS, SHOT_SPEED};
use std::f32::consts::{PI, TAU};

/// How far ahead a heading must be clear to keep it.
const LOOKAHEAD: f32 = 1.5;
/// Fire at opponents closer than this (a shot flies `SHOT_SPEED * SHOT_LIFE` = 18 tiles; shots
/// at the edge of that mostly miss a moving target).
pub const FIRE_RANGE: f32 = SHOT_SPEED * (SHOT_LIFE_MS as f32 / 1000.0) * 0.6;
/// Candidate headings looked at when the current one is blocked.
const CANDIDATES: usize = 16;

/// The map as walls, from the game's `welcome`.
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    width: i32,
    height: i32,
    walls: Vec<bool>,
}

impl Grid {
    /// `rows[y]` is a string of `#` (wall) and anything else (floor).
    pub fn from_rows(rows: &[String]) -> Grid {
        let height = rows.len() as i32;
        let width = rows.iter().map(|r| r.chars().count()).max().unwrap_or(0) as i32;
        let mut walls = vec![true; (width * height) as usize];
        for (y, row) in rows.iter().enumerate() {
            for (x, c) in row.chars().enumerate() {
                walls[y * width as usize + x] = c == '#';
            }
        }
        Grid {
            width,
            height,
            walls,
        }
    }

    pub fn from_map(map: &MapView) -> Grid {
        Grid::from_rows(&map.rows)
    }

    /// Whether tile (`tx`, `ty`) is a wall; everything outside the map is.
    pub fn wall(&self, tx: i32, ty: i32) -> bool {
        if tx < 0 || ty < 0 || tx >= self.width || ty >= self.height {
            return true;
        }
        self.walls[(ty * self.width + tx) as usize]
    }

    /// Whether a player centred at (`x`, `y`) touches no wall.
    pub fn free(&self, x: f32, y: f32) -> bool {
        let r = PLAYER_RADIUS;
        let (x0, x1) = ((x - r).floor() as i32, (x + r).floor() as i32);
        let (y0, y1) = ((y - r).floor() as i32, (y + r).floor() as i32);
        (y0..=y1).all(|ty| (x0..=x1).all(|tx| !self.wall(tx, ty)))
    }

    /// How far a player can move from (`x`, `y`) along `angle` before touching a wall, up to
    /// `max` tiles.
    pub fn clearance(&self, x: f32, y: f32, angle: f32, max: f32) -> f32 {
        const STEP: f32 = 0.2;
        let (dx, dy) = (angle.cos(), angle.sin());
        let mut d = 0.0;
        while d < max {
            let next = d + STEP;
            if !self.free(x + dx * next, y + dy * next) {
                return d;
            }
            d = next;
        }
        max
    }

    /// Whether a straight shot from `a` to `b` crosses no wall tile.
    pub fn line_of_sight(&self, a: (f32, f32), b: (f32, f32)) -> bool {
        let (dx, dy) = (b.0 - a.0, b.1 - a.1);
        let len = (dx * dx + dy * dy).sqrt();
        let steps = (len / 0.25).ceil().max(1.0) as i32;
        (0..=steps).all(|i| {
            let t = i as f32 / steps as f32;
            let (x, y) = (a.0 + dx * t, a.1 + dy * t);
            !self.wall(x.floor() as i32, y.floor() as i32)
        })
    }
}

/// The smallest angle between two headings, in [0, π].
pub fn angle_between(a: f32, b: f32) -> f32 {
    let d = (a - b).rem_euclid(TAU);
    d.min(TAU - d)
}

/// The heading to keep wandering along. Keeps `heading` (nudged by `turn`, a random number in
/// [-1, 1]) while the way ahead is clear; otherwise turns to the candidate direction with the
/// most room, preferring small turns. A player boxed in on all sides turns around.
pub fn wander(grid: &Grid, pos: (f32, f32), heading: f32, turn: f32) -> f32 {
    let nudged = heading + turn * 0.15;
    if grid.clearance(pos.0, pos.1, nudged, LOOKAHEAD) >= LOOKAHEAD {
        return nudged.rem_euclid(TAU);
    }
    let mut best = ((heading + PI).rem_euclid(TAU), f32::MIN);
    for i in 0..CANDIDATES {
        let a = heading + TAU * i as f32 / CANDIDATES as f32 + turn * 0.1;
        let room = grid.clearance(pos.0, pos.1, a, 4.0);
        if room < 0.2 {
            continue;
        }
        let score = room - 0.5 * angle_between(a, heading);
        if score > best.1 {
            best = (a.rem_euclid(TAU), score);
        }
    }
    best.0
}

/// The nearest living opponent of `me` (another team).
pub fn nearest_opponent<'a>(me: &PlayerView, players: &'a [PlayerView]) -> Option<&'a PlayerView> {
    players
        .iter()
        .filter(|p| p.alive && p.team != me.team && p.id != me.id)
        .min_by(|a, b| {
            dist2(me, a)
                .partial_cmp(&dist2(me, b))
                .unwrap_or(std::cmp::Ordering::Equal)
        })
}

fn dist2(a: &PlayerView, b: &PlayerView) -> f32 {
    (a.x - b.x).powi(2) + (a.y - b.y).powi(2)
}

/// The controls for one tick.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Controls {
    pub dx: f32,
    pub dy: f32,
    pub fire: bool,
    pub aim: f32,
    /// The heading to remember for the next tick.
    pub heading: f32,
}

/// One tick's decision for the player `me_id` in `players`: move (toward the nearest opponent
/// when the way is clear, else wander), aim at that opponent, fire when in range and in sight.
/// A dead player (or one missing from the state) stands still.
pub fn decide(
    grid: &Grid,
    me_id: &str,
    players: &[PlayerView],
    heading: f32,
    turn: f32,
) -> Controls {
    let idle = Controls {
        dx: 0.0,
        dy: 0.0,
        fire: false,
        aim: heading,
        heading,
    };
    let Some(me) = players.iter().find(|p| p.id.as_str() == me_id) else {
        return idle;
    };
    if !me.alive {
        return idle;
    }
    let pos = (me.x, me.y);
    let target = nearest_opponent(me, players);
    let (mut heading, mut aim, mut fire) = (heading, heading, false);
    match target {
        Some(t) => {
            let to = (t.y - me.y).atan2(t.x - me.x);
            let dist = dist2(me, t).sqrt();
            aim = to;
            fire = dist <= FIRE_RANGE && grid.line_of_sight(pos, (t.x, t.y));
            // Close in until well within range, keeping a little distance; wander otherwise.
            if dist > FIRE_RANGE * 0.5 && grid.clearance(pos.0, pos.1, to, LOOKAHEAD) >= LOOKAHEAD {
                heading = to;
            } else {
                heading = wander(grid, pos, heading, turn);
            }
        }
        None => heading = wander(grid, pos, heading, turn),
    }
    Controls {
        dx: heading.cos(),
        dy: heading.sin(),
        fire,
        aim: aim.rem_euclid(TAU),
        heading,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_protocol::PlayerId;

    fn grid(rows: &[&str]) -> Grid {
        Grid::from_rows(&rows.iter().map(|r| r.to_string()).collect::<Vec<_>>())
    }

    fn player(id: &str, team: u32, x: f32, y: f32, alive: bool) -> PlayerView {
        PlayerView {
            id: PlayerId::new(id).expect("id"),
            team,
            x,
            y,
            hp: 100,
            alive,
            connected: true,
            kills: 0,
            deaths: 0,
        }
    }

    const ROOM: [&str; 7] = [
        "##########",
        "#........#",
        "#........#",
        "#...##...#",
        "#........#",
        "#........#",
        "##########",
    ];

    #[test]
    fn walls_and_clearance() {
        let g = grid(&ROOM);
        assert!(g.wall(0, 0) && g.wall(4, 3) && !g.wall(1, 1));
        assert!(
            g.wall(-1, 2) && g.wall(10, 2) && g.wall(3, 7),
            "outside is wall"
        );
        assert!(g.free(1.5, 1.5));
        assert!(!g.free(1.2, 1.5), "touches the left wall");
        // From (1.5, 1.5) eastwards there are 8 floor tiles: room until the radius hits x = 9.
        let c = g.clearance(1.5, 1.5, 0.0, 20.0);
        assert!((6.9..=7.2).contains(&c), "{c}");
        assert_eq!(g.clearance(1.5, 1.5, PI, 5.0), 0.0, "wall right behind");
        assert!(g.line_of_sight((1.5, 1.5), (8.5, 1.5)));
        assert!(
            !g.line_of_sight((2.5, 3.5), (7.5, 3.5)),
            "the pillar blocks"
        );
    }

    #[test]
    fn wandering_keeps_a_clear_heading_and_turns_away_from_walls() {
        let g = grid(&ROOM);
        assert_eq!(
            wander(&g, (2.5, 1.5), 0.0, 0.0),
            0.0,
            "clear ahead: keep going"
        );
        // Facing the east wall from one tile away: turn to a direction with room.
        let h = wander(&g, (8.5, 2.0), 0.0, 0.0);
        assert!(
            angle_between(h, 0.0) > PI / 4.0,
            "still facing the wall: {h}"
        );
        assert!(g.clearance(8.5, 2.0, h, 4.0) > 1.0, "{h} has no room");
        // Wandering for a while never walks into a wall.
        let (mut pos, mut heading) = ((1.5f32, 1.5f32), 0.3f32);
        let mut rng = fastrand::Rng::with_seed(3);
        let mut moved = 0;
        for _ in 0..2000 {
            heading = wander(&g, pos, heading, rng.f32() * 2.0 - 1.0);
            let next = (pos.0 + heading.cos() * 0.05, pos.1 + heading.sin() * 0.05);
            if g.free(next.0, next.1) {
                pos = next;
                moved += 1;
            }
        }
        assert!(
            moved > 1900,
            "stuck against walls in {} of 2000 ticks",
            2000 - moved
        );
    }

    #[test]
    fn bots_aim_at_the_nearest_living_opponent_and_fire_in_sight() {
        let g = grid(&ROOM);
        let players = vec![
            player("me", 0, 1.5, 1.5, true),
            player("mate", 0, 2.5, 1.5, true),
            player("far", 1, 8.5, 5.5, true),
            player("near", 1, 1.5, 5.5, true),
            player("dead", 1, 2.5, 2.5, false),
        ];
        let me = &players[0];
        assert_eq!(
            nearest_opponent(me, &players).map(|p| p.id.as_str()),
            Some("near")
        );
        let c = decide(&g, "me", &players, 0.0, 0.0);
        assert!(
            (c.aim - PI / 2.0).abs() < 1e-3,
            "aims down at near: {}",
            c.aim
        );
        assert!(c.fire, "near is 4 tiles away in plain sight");
        // Behind the pillar: aim but hold fire.
        let hidden = vec![
            player("me", 0, 2.5, 3.5, true),
            player("foe", 1, 7.5, 3.5, true),
        ];
        let c = decide(&g, "me", &hidden, 0.0, 0.0);
        assert!(c.aim.abs() < 1e-3 && !c.fire, "{c:?}");
        // Nobody to shoot: wander, no fire; dead: stand still.
        let alone = vec![player("me", 0, 1.5, 1.5, true)];
        let c = decide(&g, "me", &alone, 0.0, 0.0);
        assert!(!c.fire && (c.dx - 1.0).abs() < 1e-3);
        let dead = vec![
            player("me", 0, 1.5, 1.5, false),
            player("foe", 1, 2.5, 1.5, true),
        ];
        let c = decide(&g, "me", &dead, 0.0, 0.0);
        assert_eq!((c.dx, c.dy, c.fire), (0.0, 0.0, false));
        assert_eq!(decide(&g, "ghost", &dead, 1.0, 0.0).heading, 1.0);
    }
}
