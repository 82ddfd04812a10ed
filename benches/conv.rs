//! Convolution kernel throughput on YOLOv12n's layer shapes: GFLOP/s of the packed
//! microkernel this CPU runs (AVX-512 or AVX2; for the shapes that a CPU with AMX runs on its
//! tiles, those and AVX-512 side by side) and of the portable `gemm`-crate path, on the same
//! pool of threads, in interleaved rounds (each variant's best).
//! `cargo bench --bench conv [-- THREADS [SHAPE | attention | tile] [packed]]`, where SHAPE (such
//! as `32->64`) keeps only the convolutions whose label contains it, `attention` runs only the
//! attention heads, `tile` only the pixel tile's loop over the taps of planes of YOLO's sizes
//! (on one thread), and `packed` skips the portable path. `cores` only times a round trip
//! between CPUs 0 and 1 (see [`cores`]).
//! The kernels are crate-private; the `bench-internals` feature of `streamdet-actors`, enabled
//! by this package's dev-dependency on it, makes them reachable from here.

use std::time::Instant;

use streamdet_actors::detect::kernels::activation::Activation;
use streamdet_actors::detect::kernels::conv::{Conv2d, ConvSpec};

/// A square convolution with SiLU, "same" padding and test weights, on the portable path.
fn conv(cin: usize, cout: usize, k: usize, stride: usize, groups: usize) -> Conv2d {
    let pad = k / 2;
    let spec = ConvSpec::square(cin, cout, groups, k, stride, pad, Activation::Silu);
    let weights = (0..cout * cin / groups * k * k).map(|i| (i % 7) as f32 * 0.01).collect();
    Conv2d::new(spec, weights, vec![0.1; cout]).expect("a valid convolution")
}

fn main() {
    if std::env::args().any(|a| a == "cores") {
        #[cfg(target_os = "linux")]
        cores();
        return;
    }
    if std::env::args().len() < 3 {
        elementwise();
    }
    let threads: usize = std::env::args().filter_map(|a| a.parse().ok()).next().unwrap_or(2);
    let only = std::env::args().skip(1).find(|a| a.contains("->"));
    let packed_only = std::env::args().any(|a| a == "packed");
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    // (cin, cout, kernel, stride, groups, input size)
    let shapes = [
        (3, 16, 3, 2, 1, 640),
        (16, 32, 3, 2, 1, 320),
        (32, 32, 1, 1, 1, 160),
        (32, 64, 1, 1, 1, 160),
        (48, 64, 1, 1, 1, 160),
        (64, 64, 3, 2, 1, 160),
        (8, 16, 3, 1, 1, 160),
        (16, 8, 3, 1, 1, 160),
        (32, 16, 3, 1, 1, 80),
        (64, 64, 3, 1, 1, 80),
        (64, 64, 3, 1, 1, 40),
        (128, 64, 3, 1, 1, 40),
        (256, 64, 3, 1, 1, 20),
        (128, 128, 3, 1, 1, 20),
        (64, 128, 3, 2, 1, 80),
        (64, 64, 3, 2, 1, 80),
        (128, 128, 3, 2, 1, 80),
        (128, 128, 1, 1, 1, 40),
        (64, 64, 1, 1, 1, 80),
        (64, 64, 1, 1, 1, 40),
        (32, 32, 3, 1, 1, 40),
        (64, 32, 1, 1, 1, 40),
        (128, 64, 1, 1, 1, 80),
        (16, 16, 3, 1, 1, 80),
        (64, 192, 1, 1, 1, 40),
        (128, 64, 1, 1, 1, 40),
        (192, 64, 1, 1, 1, 40),
        (192, 128, 1, 1, 1, 40),
        (384, 128, 1, 1, 1, 20),
        (256, 32, 1, 1, 1, 80),
        (384, 64, 1, 1, 1, 40),
        (384, 256, 1, 1, 1, 20),
        (128, 256, 3, 2, 1, 40),
        (256, 256, 1, 1, 1, 20),
        (128, 128, 7, 1, 128, 40),
        (80, 80, 3, 1, 80, 80),
    ];
    println!("threads {threads}");
    let tile_only = std::env::args().any(|a| a == "tile");
    if only.is_none() && !tile_only {
        attention(&pool);
    }
    if std::env::args().any(|a| a == "attention") {
        return;
    }
    if tile_only {
        #[cfg(target_arch = "x86_64")]
        tile();
        return;
    }
    for (cin, cout, k, stride, groups, size) in shapes {
        if only.as_ref().is_some_and(|only| !format!("{cin}->{cout} k{k} s{stride} {size}px").contains(only.as_str())) {
            continue;
        }
        let input: Vec<f32> = (0..cin * size * size).map(|i| (i % 13) as f32 * 0.05).collect();
        let packed = conv(cin, cout, k, stride, groups).with_packed_weights();
        let packed_name = match packed.isa() {
            Some(_) if packed.runs_amx() => "AMX".to_string(),
            Some(isa) => format!("{isa:?}"),
            // Depthwise convolutions have their own kernel; without a microkernel, the portable
            // path runs twice.
            None => "unpacked".to_string(),
        };
        let mut variants = vec![(packed_name, packed.clone())];
        if packed.runs_amx() {
            variants.push((format!("{:?}", packed.isa().expect("packed")), packed.clone().without_amx()));
        }
        if packed.runs_pointwise_rows() {
            variants.push(("no rows".to_string(), packed.clone().without_amx().without_pointwise_rows()));
        }
        if !packed_only {
            variants.insert(0, ("portable".to_string(), conv(cin, cout, k, stride, groups)));
        }
        // Rounds of every variant in turn; each variant's best round is reported, so that a
        // slow spell of a shared machine falls on all of them.
        let mut best = vec![f64::INFINITY; variants.len()];
        for _round in 0..3 {
            for ((_, c), best) in variants.iter().zip(&mut best) {
                let (oh, ow) = c.output_size(size, size).unwrap();
                let flops = 2.0 * (cout * oh * ow * cin / groups * k * k) as f64;
                std::hint::black_box(pool.install(|| c.run(&input, 1, size, size, None)));
                let reps = ((0.7e9 / flops) as usize).clamp(3, 70);
                let start = Instant::now();
                for _ in 0..reps {
                    std::hint::black_box(pool.install(|| c.run(&input, 1, size, size, None)));
                }
                *best = best.min(start.elapsed().as_secs_f64() / reps as f64);
            }
        }
        for ((name, c), secs) in variants.iter().zip(best) {
            let (oh, ow) = c.output_size(size, size).unwrap();
            let flops = 2.0 * (cout * oh * ow * cin / groups * k * k) as f64;
            println!("conv {cin:>3}->{cout:<3} k{k} s{stride} g{groups:<3} {size:>3}px  {name:<8} {:>7.3} ms  {:>6.1} GFLOP/s", secs * 1e3, flops / secs / 1e9);
        }
    }
}

/// YOLOv12n's fused attention heads: 8 (4 areas by 2 heads at 40x40) and 4 (20x20) items of
/// 400 queries and keys, 32 deep, queries stored transposed as the model's views leave them.
fn attention(pool: &rayon::ThreadPool) {
    use streamdet_actors::detect::kernels::attention::{AttentionLayout, AttentionShape, attention};
    for batch in [8, 4] {
        let shape = AttentionShape { batch, queries: 400, keys: 400, depth: 32, channels: 32 };
        let layout = AttentionLayout { q_transposed: true, k_transposed: false, v_transposed: false };
        let operand = |len: usize, modulus: usize| -> Vec<f32> { (0..len).map(|i| (i % modulus) as f32 * 0.05 - 0.3).collect() };
        let (q, k, v) = (operand(batch * 400 * 32, 13), operand(batch * 32 * 400, 7), operand(batch * 32 * 400, 11));
        // Two products of `400 x 400 x 32` multiply-adds per item.
        let flops = 2.0 * 2.0 * (batch * 400 * 400 * 32) as f64;
        let run = || pool.install(|| attention(&q, &k, &v, shape, layout, 0.18));
        std::hint::black_box(run());
        let reps = 50;
        let start = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(run());
        }
        let secs = start.elapsed().as_secs_f64() / reps as f64;
        println!("attention {batch} x [400 queries, 400 keys, 32 deep]  {:>7.3} ms  {:>6.1} GFLOP/s", secs * 1e3, flops / secs / 1e9);
    }
}

/// The pixel tile's loop over 128 taps, each in a plane of its own (as a pointwise convolution
/// with 128 input channels reads them), on planes of YOLO's sizes at 640x640 (20x20 to 160x160)
/// and the same planes one cache line (16 floats) longer, for each microkernel this CPU runs:
/// GFLOP/s on one thread, the best of three rounds.
#[cfg(target_arch = "x86_64")]
fn tile() {
    use streamdet_actors::detect::kernels::conv::tile_gflops;
    use streamdet_actors::detect::kernels::isa::Isa;
    for isa in [Isa::Avx2, Isa::Avx512].into_iter().filter(|isa| isa.supported()) {
        for side in [20, 40, 80, 160] {
            let plane = side * side;
            let best = |floats: usize| (0..3).filter_map(|_| tile_gflops(isa, 128, floats, 2e9)).fold(0.0, f64::max);
            let (exact, longer) = (best(plane), best(plane + 16));
            println!("tile {isa:?}, 128 taps, planes of {side}x{side}: {exact:>6.1} GFLOP/s; one line longer: {longer:>6.1} ({:.2})", exact / longer);
        }
    }
}

/// Element-wise kernels: nanoseconds per element on one thread.
fn elementwise() {
    use streamdet_actors::detect::kernels::activation::{UnaryFn, map_inplace, softmax_inplace};
    let mut data: Vec<f32> = (0..1 << 20).map(|i| (i % 1000) as f32 / 100.0 - 5.0).collect();
    for (name, f) in [("exp", UnaryFn::Exp), ("sigmoid", UnaryFn::Sigmoid)] {
        let start = Instant::now();
        for _ in 0..20 {
            map_inplace(&mut data, f);
            map_inplace(&mut data, UnaryFn::Sigmoid);
        }
        println!("{name}+sigmoid: {:.3} ns/element", start.elapsed().as_secs_f64() * 1e9 / (40 << 20) as f64);
    }
    let start = Instant::now();
    for _ in 0..20 {
        data.chunks_mut(400).for_each(softmax_inplace);
    }
    println!("softmax rows of 400: {:.3} ns/element", start.elapsed().as_secs_f64() * 1e9 / (20 << 20) as f64);
}

/// The time of a round trip between CPUs 0 and 1: one thread pinned to each bounces a flag
/// between them, 200,000 times a round, five rounds. On a cloud VM it tells how far apart the
/// host holds the two vCPUs at the moment, which moves the team of threads' times: on the Zen 4
/// EPYC some 70 ns close, some 340 ns apart, in spells of seconds to minutes.
#[cfg(target_os = "linux")]
fn cores() {
    use std::sync::atomic::{AtomicBool, Ordering};
    fn pin(cpu: usize) -> bool {
        // SAFETY: `set` is a zeroed `cpu_set_t` the macros fill in place, and
        // `sched_setaffinity` reads `size_of` of it for the calling thread (pid 0).
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
        }
    }
    const BOUNCES: u32 = 200_000;
    for _ in 0..5 {
        let ball = AtomicBool::new(false);
        let pinned = std::thread::scope(|scope| {
            let other = scope.spawn(|| {
                let pinned = pin(1);
                for _ in 0..BOUNCES {
                    while !ball.load(Ordering::Acquire) {
                        std::hint::spin_loop();
                    }
                    ball.store(false, Ordering::Release);
                }
                pinned
            });
            let pinned = pin(0);
            let start = Instant::now();
            for _ in 0..BOUNCES {
                ball.store(true, Ordering::Release);
                while ball.load(Ordering::Acquire) {
                    std::hint::spin_loop();
                }
            }
            let ns = start.elapsed().as_secs_f64() * 1e9 / f64::from(BOUNCES);
            let pinned = pinned && other.join().expect("the other thread");
            println!("round trip between CPUs 0 and 1: {ns:.0} ns{}", if pinned { "" } else { " (not pinned: fewer than 2 CPUs allowed)" });
            pinned
        });
        if !pinned {
            return;
        }
    }
}
