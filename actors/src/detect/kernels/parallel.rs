//! The parallel loops of the kernels, on a team of threads that spin between loops.
//!
//! A model runs some 140 parallel loops per frame, most of them a fraction of a millisecond
//! long. On rayon's pool, a worker that finds no work soon sleeps, and waking it for the next
//! loop is a system call; on a 2-core VM that was 3-4 ms of system time per YOLOv12n frame.
//! Worse, rayon hands tasks to whichever thread comes first, so a layer's input was mostly in
//! the other core's L2 cache: on a 2-core Xeon (2 MiB L2 per core), YOLOv12n's layers ran
//! 1.53x (pointwise) to 1.75x faster on two threads than on one, and some pointwise layers of
//! 40x40 pixels no faster at all (128 -> 64 channels, 0.23 ms on one thread, 0.22 on two).
//!
//! A [`Team`] keeps its helpers spinning while a model runs (between runs they sleep),
//! announces each loop in one atomic word that a helper joins, and deals the tasks out in
//! contiguous shares: thread `t` of `n` first runs tasks `t * tasks / n ..`, then takes what
//! is left of the others' shares. The kernels number their tasks along the image (rows,
//! stretches of pixels), so a thread computes the same part of the image layer after layer
//! and finds its input in its own L2 cache. YOLOv12n at 2 threads on that Xeon went from 44.7
//! to 41.9 ms (sums of per-step times), with 0.08 s of system time per 110 calls instead of
//! 0.43.
//!
//! A loop of [`for_each`] hands out one task at a time; one of [`for_each_range`], ranges
//! of its units that halve as a share runs out, so a kernel with small units (a row of
//! output) leaves the thread that finishes first little to wait for.
//!
//! Outside a team (tests, benchmarks that call a kernel alone, or a second thread calling a
//! model whose team is busy), [`for_each`] runs on the current rayon pool.

use std::any::Any;
use std::cell::Cell;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;

use rayon::prelude::*;

/// Spins of a waiting thread before it yields its core at each further look (a spin is a
/// `pause`, some 40-140 cycles), so a helper of a team whose leader is busy with
/// serial work does not starve other processes.
const SPINS_BEFORE_YIELDING: u32 = 1 << 14;

// The team of the running model, on its leader's thread; and whether this thread is inside a
// task (where a nested loop runs serially).
thread_local! {
    static LEADING: Cell<*const Shared> = const { Cell::new(std::ptr::null()) };
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
}

/// [`Shared::state`]: the loop number is counted in units of this; below it, the closed bit
/// and the number of helpers that joined.
const LOOP: u64 = 1 << 16;
const CLOSED: u64 = 1 << 15;
const JOINED: u64 = CLOSED - 1;

/// A loop handed to the helpers: the body, as a pointer whose lifetime [`for_each`] guards
/// (it waits for every helper that joined to finish before the body goes out of scope), and
/// its tasks.
struct Job {
    body: *const (dyn Fn(Range<usize>) + Sync),
    tasks: usize,
    claims: Claims,
}

/// How many tasks a thread claims at a time.
#[derive(Clone, Copy)]
enum Claims {
    /// One.
    One,
    /// Half of what is left of the share it claims from, rounded up.
    Halves,
}

/// What the leader and its helpers share.
struct Shared {
    helpers: usize,
    /// The current loop's number (bits 16 up), whether it is closed to helpers (bit 15) and
    /// how many helpers joined it (bits 0-14). A helper joins a loop by counting itself in
    /// while it is open; the leader closes it once its own tasks are done and then waits for
    /// the helpers that joined, only: a helper that the system has not scheduled in time
    /// misses the loop, and does not hold up the leader.
    state: AtomicU64,
    /// The current loop ([`Job`]), written before `state` announces it.
    job: AtomicPtr<Job>,
    /// The next task of each thread's share of the current loop.
    cursors: Vec<Cursor>,
    /// Helpers done with the current loop (of those that joined it).
    finished: AtomicUsize,
    /// While a model runs: helpers spin; otherwise they sleep. Also what keeps a second
    /// thread from leading the team at the same time.
    active: AtomicBool,
    shutdown: AtomicBool,
    /// A helper's task panicked: the payload, re-raised on the leader.
    panic: std::sync::Mutex<Option<Box<dyn Any + Send>>>,
}

/// A thread's place in its share of a loop, alone on its cache line.
#[repr(align(64))]
struct Cursor(AtomicUsize);

/// A leader (the thread that calls [`Team::lead`]) and `threads - 1` helper threads.
pub struct Team {
    shared: Arc<Shared>,
    helpers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Team {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Team").field("threads", &(self.shared.helpers + 1)).finish()
    }
}

impl Team {
    /// A team of `threads` threads in all (the leader included, at most 1024); helper threads
    /// are named `{name}-{i}`.
    pub fn new(threads: usize, name: &str) -> std::io::Result<Team> {
        let helpers = threads.clamp(1, 1024) - 1;
        let shared = Arc::new(Shared {
            helpers,
            state: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            cursors: (0..=helpers).map(|_| Cursor(AtomicUsize::new(0))).collect(),
            finished: AtomicUsize::new(0),
            active: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            panic: std::sync::Mutex::new(None),
        });
        let mut team = Team { shared, helpers: Vec::with_capacity(helpers) };
        for i in 0..helpers {
            let shared = Arc::clone(&team.shared);
            // On an error, `team` drops here and stops the helpers started so far.
            team.helpers.push(std::thread::Builder::new().name(format!("{name}-{}", i + 1)).spawn(move || help(&shared, i + 1))?);
        }
        Ok(team)
    }

    /// Runs `f` on this thread as the team's leader: the kernels' loops inside it run on the
    /// whole team, whose helpers spin until `f` returns. While another thread leads the team
    /// (or inside a team already), `f` runs as it would without one.
    pub fn lead<R>(&self, f: impl FnOnce() -> R) -> R {
        if self.helpers.is_empty() || !LEADING.get().is_null() || self.shared.active.swap(true, Ordering::Acquire) {
            return f();
        }
        /// Puts the helpers back to sleep and this thread out of the lead, also on a panic.
        struct Stand<'a>(&'a Shared);
        impl Drop for Stand<'_> {
            fn drop(&mut self) {
                self.0.active.store(false, Ordering::Release);
                LEADING.set(std::ptr::null());
            }
        }
        let shared: &Shared = &self.shared;
        for helper in &self.helpers {
            helper.thread().unpark();
        }
        LEADING.set(shared);
        let _stand = Stand(shared);
        f()
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        for helper in self.helpers.drain(..) {
            helper.thread().unpark();
            // A helper never panics outside a task (those panics are caught and handed on).
            let _ = helper.join();
        }
    }
}

/// Threads that [`for_each`] runs on here: the team's, inside [`Team::lead`]; one inside a
/// task; the current rayon pool's otherwise.
pub fn threads() -> usize {
    if IN_TASK.get() {
        return 1;
    }
    let leading = LEADING.get();
    if leading.is_null() {
        rayon::current_num_threads()
    } else {
        // SAFETY: `LEADING` is set only while `Team::lead` runs on this thread, which keeps
        // the team (and so its `Shared`) alive.
        unsafe { (*leading).helpers + 1 }
    }
}

/// Runs `body(task)` for every `task < tasks`, in parallel (see the module's notes), and
/// returns when all have run. A panic in a task is re-raised here once every thread has
/// left the loop.
pub fn for_each(tasks: usize, body: impl Fn(usize) + Sync) {
    if tasks == 0 {
        return;
    }
    if IN_TASK.get() || tasks == 1 {
        (0..tasks).for_each(body);
        return;
    }
    if LEADING.get().is_null() {
        let body = &body;
        (0..tasks).into_par_iter().for_each(body);
        return;
    }
    on_team(tasks, Claims::One, &|range: Range<usize>| range.for_each(&body));
}

/// Runs `body(range)` over ranges of consecutive units that together cover `0..units` once,
/// in parallel, and returns when all have run; a panic in one is re-raised here.
///
/// On a team, each thread claims from its share (or, when done, from the others') half of
/// what is left at a time: ranges shrink towards the end of a loop to a single unit, so the
/// thread that finishes first waits for at most a unit of the other's work, where tasks of
/// equal size left it waiting for half a task on average. A kernel makes its units small (a
/// row of output) and does per range what a task did.
pub fn for_each_range(units: usize, body: impl Fn(Range<usize>) + Sync) {
    if units == 0 {
        return;
    }
    if IN_TASK.get() || units == 1 {
        body(0..units);
        return;
    }
    if LEADING.get().is_null() {
        // On the rayon pool: about four ranges per thread.
        let per_range = units.div_ceil(4 * rayon::current_num_threads());
        (0..units.div_ceil(per_range)).into_par_iter().for_each(|i| body(i * per_range..((i + 1) * per_range).min(units)));
        return;
    }
    on_team(units, Claims::Halves, &body);
}

/// Runs a loop of `tasks` on the team this thread leads, which [`LEADING`] holds.
fn on_team(tasks: usize, claims: Claims, body: &(dyn Fn(Range<usize>) + Sync)) {
    // SAFETY: as in `threads`; the callers check that `LEADING` is set.
    let shared = unsafe { &*LEADING.get() };
    // SAFETY: only the lifetime is erased. A helper uses `body` between joining this loop and
    // adding itself to `finished`; `Finish` below closes the loop to further helpers and waits
    // for those that joined before this function returns or unwinds, so `body` outlives every
    // use.
    let body: *const (dyn Fn(Range<usize>) + Sync) = unsafe { std::mem::transmute(body) };
    let mut job = Job { body, tasks, claims };
    for (t, cursor) in shared.cursors.iter().enumerate() {
        cursor.0.store(share_start(t, tasks, shared.cursors.len()), Ordering::Relaxed);
    }
    shared.finished.store(0, Ordering::Relaxed);
    shared.job.store(&mut job, Ordering::Relaxed);
    // Opens the next loop, with no helper in it yet. Only the leader writes the loop number,
    // and the last loop is closed: no helper's count can land on this one. The release
    // publishes the job, the cursors and `finished` to the helpers that join.
    let number = shared.state.load(Ordering::Relaxed) / LOOP + 1;
    shared.state.store(number * LOOP, Ordering::Release);

    /// Closes the loop and waits for the helpers that joined it, also when the leader's own
    /// task panics.
    struct Finish<'a>(&'a Shared);
    impl Drop for Finish<'_> {
        fn drop(&mut self) {
            let joined = (self.0.state.fetch_or(CLOSED, Ordering::AcqRel) & JOINED) as usize;
            let mut spins = 0u32;
            while self.0.finished.load(Ordering::Acquire) < joined {
                spin(&mut spins);
            }
            if std::thread::panicking() {
                // The leader's own panic goes on; a helper's from the same loop goes with it.
                self.0.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
            }
        }
    }
    let finish = Finish(shared);
    take_tasks(shared, &job, 0);
    drop(finish);
    if let Some(payload) = shared.panic.lock().unwrap_or_else(|e| e.into_inner()).take() {
        std::panic::resume_unwind(payload);
    }
}

/// `f(task)` for every `task < tasks`, run as [`for_each`] runs them, in task order.
pub fn map<T: Send>(tasks: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let results: Vec<std::sync::Mutex<Option<T>>> = (0..tasks).map(|_| std::sync::Mutex::new(None)).collect();
    for_each(tasks, |task| {
        // Each task fills its own cell: the lock is never contended.
        *results[task].lock().unwrap_or_else(|e| e.into_inner()) = Some(f(task));
    });
    results.into_iter().map(|cell| cell.into_inner().unwrap_or_else(|e| e.into_inner()).expect("for_each runs every task")).collect()
}

/// `f(index, chunk)` for each `chunk`-long piece of `data` (the last may be shorter), run as
/// [`for_each`] runs tasks.
pub fn for_each_chunk_mut<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    assert!(chunk > 0, "chunks of at least one element");
    let len = data.len();
    let base = SendMut(data.as_mut_ptr());
    for_each(len.div_ceil(chunk), |index| {
        let start = index * chunk;
        // SAFETY: piece `index` is `start..min(start + chunk, len)` of `data`, which the
        // exclusive borrow keeps alive and unaliased for this call; each task gets its own
        // index, so no two tasks' pieces overlap.
        let piece = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), chunk.min(len - start)) };
        f(index, piece);
    });
}

/// `f(index, piece)` for each range of `data` in `ranges`, run as [`for_each`] runs tasks. The
/// ranges must lie in `data`, in increasing order, without overlapping (checked).
pub fn for_each_range_mut<T: Send>(data: &mut [T], ranges: &[std::ops::Range<usize>], f: impl Fn(usize, &mut [T]) + Sync) {
    let ordered = ranges.iter().all(|r| r.start <= r.end) && ranges.windows(2).all(|w| w[0].end <= w[1].start);
    assert!(ordered && ranges.last().is_none_or(|r| r.end <= data.len()), "ranges in order, apart and inside the slice");
    let base = SendMut(data.as_mut_ptr());
    for_each(ranges.len(), |index| {
        let range = &ranges[index];
        // SAFETY: `range` lies inside `data` (checked above), which the exclusive borrow keeps
        // alive and unaliased for this call; the ranges do not overlap (checked) and each task
        // gets its own index, so no two tasks' pieces overlap.
        let piece = unsafe { std::slice::from_raw_parts_mut(base.get().add(range.start), range.len()) };
        f(index, piece);
    });
}

/// The start of a slice whose disjoint pieces tasks take ([`for_each_chunk_mut`],
/// [`for_each_range_mut`]).
struct SendMut<T>(*mut T);
// SAFETY: the tasks that share it each make a slice of their own piece only.
unsafe impl<T: Send> Sync for SendMut<T> {}
impl<T> SendMut<T> {
    /// Taking `self` makes closures capture the wrapper, not its raw-pointer field.
    fn get(&self) -> *mut T {
        self.0
    }
}

/// The first task of thread `t`'s share of `tasks` tasks on `threads` threads.
fn share_start(t: usize, tasks: usize, threads: usize) -> usize {
    t * tasks / threads
}

/// Runs the tasks of `job` that no other thread has taken, as a task: thread `me`'s share
/// first, then the rest of the others'.
fn take_tasks(shared: &Shared, job: &Job, me: usize) {
    IN_TASK.set(true);
    /// Leaves the task state, also on a panic.
    struct Leave;
    impl Drop for Leave {
        fn drop(&mut self) {
            IN_TASK.set(false);
        }
    }
    let _leave = Leave;
    // SAFETY: `for_each` keeps the body alive until every thread has left this loop.
    let body = unsafe { &*job.body };
    let threads = shared.cursors.len();
    for owner in (me..threads).chain(0..me) {
        let end = share_start(owner + 1, job.tasks, threads);
        let cursor = &shared.cursors[owner].0;
        loop {
            let claimed = match job.claims {
                Claims::One => {
                    let task = cursor.fetch_add(1, Ordering::Relaxed);
                    task..task + 1
                }
                Claims::Halves => {
                    let first = cursor.load(Ordering::Relaxed);
                    let last = first + end.saturating_sub(first).div_ceil(2);
                    if first < end && cursor.compare_exchange_weak(first, last, Ordering::Relaxed, Ordering::Relaxed).is_err() {
                        continue;
                    }
                    first..last
                }
            };
            if claimed.start >= end {
                break;
            }
            body(claimed);
        }
    }
}

/// A helper's life: sleep while no model runs; while one runs, spin until the leader hands
/// out a loop, and take its tasks.
fn help(shared: &Shared, me: usize) {
    // Loop 0 is never run: the leader's first is 1.
    let mut seen = 0;
    loop {
        let mut spins = 0u32;
        // Until this helper joins a loop.
        loop {
            let state = shared.state.load(Ordering::Acquire);
            if state / LOOP != seen {
                seen = state / LOOP;
                if join(shared, state) {
                    break;
                }
                continue;
            }
            if shared.shutdown.load(Ordering::Acquire) {
                return;
            }
            if shared.active.load(Ordering::Acquire) {
                spin(&mut spins);
            } else {
                // Woken by `lead` (or `drop`); a spurious wake-up only loops again.
                std::thread::park();
                spins = 0;
            }
        }
        // SAFETY: the leader stored this loop's job before opening the loop (the acquiring
        // join synchronises with that), and keeps it alive until every helper that joined has
        // added itself to `finished`.
        let job = unsafe { &*shared.job.load(Ordering::Relaxed) };
        if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| take_tasks(shared, job, me))) {
            // Stop the others taking tasks; the leader re-raises the first panic.
            for cursor in &shared.cursors {
                cursor.0.store(usize::MAX / 2, Ordering::Relaxed);
            }
            shared.panic.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(payload);
        }
        shared.finished.fetch_add(1, Ordering::Release);
    }
}

/// Counts this helper into the loop that `state` (a value of [`Shared::state`]) announces,
/// unless the leader has closed it or moved on; whether it did.
fn join(shared: &Shared, mut state: u64) -> bool {
    let number = state / LOOP;
    while state / LOOP == number && state & CLOSED == 0 {
        match shared.state.compare_exchange_weak(state, state + 1, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return true,
            Err(now) => state = now,
        }
    }
    false
}

/// One round of waiting: a spin, or after [`SPINS_BEFORE_YIELDING`] of them, a yield.
fn spin(spins: &mut u32) {
    if *spins < SPINS_BEFORE_YIELDING {
        *spins += 1;
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_inside_and_outside_a_team() {
        let team = Team::new(3, "test-team").unwrap();
        let check = || {
            for tasks in [0, 1, 2, 7, 100] {
                let counts: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
                for_each(tasks, |t| {
                    counts[t].fetch_add(1, Ordering::Relaxed);
                    // A nested loop runs serially, inside the task.
                    let inner = AtomicUsize::new(0);
                    for_each(3, |_| {
                        inner.fetch_add(1, Ordering::Relaxed);
                    });
                    assert_eq!(inner.load(Ordering::Relaxed), 3);
                });
                assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1), "{tasks} tasks");
            }
        };
        assert_eq!(team.lead(threads), 3);
        // A second thread that calls while the team is led runs on the rayon pool instead.
        team.lead(|| std::thread::scope(|s| s.spawn(|| team.lead(check)).join().unwrap()));
        team.lead(check);
        // Again, after the helpers went back to sleep; and outside the team.
        team.lead(check);
        check();
    }

    #[test]
    fn ranges_cover_every_unit_once_and_shrink_towards_the_end() {
        let team = Team::new(2, "test-team").unwrap();
        let check = || {
            for units in [0, 1, 2, 7, 100, 1000] {
                let counts: Vec<AtomicUsize> = (0..units).map(|_| AtomicUsize::new(0)).collect();
                let claims = std::sync::Mutex::new(Vec::new());
                for_each_range(units, |range| {
                    assert!(!range.is_empty() && range.end <= units, "{range:?} of {units}");
                    range.clone().for_each(|u| {
                        counts[u].fetch_add(1, Ordering::Relaxed);
                    });
                    claims.lock().unwrap().push(range);
                });
                assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1), "{units} units");
                let claims = claims.into_inner().unwrap();
                if units >= 100 && !LEADING.get().is_null() {
                    // Halves of what is left of a share: a range of a single unit ends it.
                    assert!(claims.iter().any(|r| r.len() >= units / 4), "{claims:?}");
                    assert!(claims.iter().any(|r| r.len() == 1), "{claims:?}");
                }
            }
        };
        team.lead(check);
        check();
        // A panic in a range reaches the caller, and the next loop runs every unit.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| team.lead(|| for_each_range(64, |r| assert!(!r.contains(&40))))));
        assert!(result.is_err());
        let ran = AtomicUsize::new(0);
        team.lead(|| {
            for_each_range(64, |r| {
                ran.fetch_add(r.len(), Ordering::Relaxed);
            })
        });
        assert_eq!(ran.load(Ordering::Relaxed), 64);
    }

    #[test]
    fn chunks_and_maps_cover_their_input() {
        let team = Team::new(2, "test-team").unwrap();
        team.lead(|| {
            let mut data = vec![0usize; 103];
            for_each_chunk_mut(&mut data, 10, |index, piece| {
                assert!(piece.len() == 10 || (index == 10 && piece.len() == 3));
                piece.iter_mut().enumerate().for_each(|(i, x)| *x = index * 10 + i);
            });
            assert!(data.iter().enumerate().all(|(i, &x)| i == x));
            assert_eq!(map(5, |t| t * t), vec![0, 1, 4, 9, 16]);
            let mut data = vec![0usize; 20];
            for_each_range_mut(&mut data, &[0..3, 3..3, 5..20], |index, piece| piece.fill(index + 1));
            assert_eq!(data.iter().filter(|&&x| x == 1).count(), 3);
            assert_eq!(data[3..5], [0, 0]);
            assert!(data[5..].iter().all(|&x| x == 3));
            let overlapping = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| for_each_range_mut(&mut data, &[0..4, 3..5], |_, _| {})));
            assert!(overlapping.is_err(), "overlapping ranges are refused");
        });
    }

    #[test]
    fn a_panic_in_a_task_reaches_the_leader_and_the_team_goes_on() {
        let team = Team::new(2, "test-team").unwrap();
        for _ in 0..3 {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                team.lead(|| {
                    for_each(64, |t| {
                        if t % 5 == 4 {
                            panic!("task {t}");
                        }
                    })
                })
            }));
            assert!(result.is_err());
            let ran = AtomicUsize::new(0);
            team.lead(|| {
                for_each(64, |_| {
                    ran.fetch_add(1, Ordering::Relaxed);
                })
            });
            assert_eq!(ran.load(Ordering::Relaxed), 64);
        }
    }
}
