//! Rotary position embedding in ggml's LLAMA ("normal") mode: adjacent pairs
//! `(x[2i], x[2i+1])` of each head rotate by `pos * base^(-2i/head_dim)`, with
//! the angles built exactly as ggml builds them (repeated multiplication by
//! `theta_scale` in f32, f32 cos/sin) so results track llama.cpp closely.

/// RoPE parameters for one head size, with an optional table of the
/// (cos, sin) pairs of the positions seen so far.
#[derive(Clone, Debug)]
pub struct Rope {
    head_dim: usize,
    theta_scale: f32,
    /// `(cos, sin)` of every pair for positions `0..table.len() / (head_dim / 2)`.
    table: Vec<(f32, f32)>,
}

/// Pairs handled with a stack buffer; larger heads allocate.
const STACK_PAIRS: usize = 256;

impl Rope {
    /// RoPE for heads of `head_dim` (even, non-zero) with frequency base `theta`.
    pub fn new(head_dim: usize, theta: f32) -> Rope {
        assert!(
            head_dim > 0 && head_dim.is_multiple_of(2),
            "Rope::new: head_dim {head_dim} must be even and non-zero"
        );
        Rope {
            head_dim,
            theta_scale: theta.powf(-2.0 / head_dim as f32),
            table: Vec::new(),
        }
    }

    /// Tabulates the angles of every position below `upto` (the table only
    /// grows), so [`Rope::apply`] at those positions does no `cos`/`sin`:
    /// 64 libm calls per row per head size otherwise. The tabulated values
    /// are the ones `apply` computes.
    pub fn tabulate(&mut self, upto: usize) {
        let half = self.head_dim / 2;
        let have = self.table.len() / half;
        for pos in have..upto {
            let mut theta = pos as f32;
            for _ in 0..half {
                self.table.push((theta.cos(), theta.sin()));
                theta *= self.theta_scale;
            }
        }
    }

    /// Head size.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Rotate `n_heads` consecutive heads in `x` (length `n_heads*head_dim`) for position `pos`.
    pub fn apply(&self, x: &mut [f32], n_heads: usize, pos: usize) {
        assert_eq!(
            x.len(),
            n_heads * self.head_dim,
            "Rope::apply: x has {} values, expected n_heads*head_dim = {n_heads}*{}",
            x.len(),
            self.head_dim
        );
        let half = self.head_dim / 2;
        let mut stack = [(0.0f32, 0.0f32); STACK_PAIRS];
        let mut heap = Vec::new();
        let cs: &[(f32, f32)] = if let Some(t) = self.table.get(pos * half..(pos + 1) * half) {
            t
        } else {
            let cs: &mut [(f32, f32)] = if half <= STACK_PAIRS {
                &mut stack[..half]
            } else {
                heap.resize(half, (0.0, 0.0));
                &mut heap
            };
            let mut theta = pos as f32;
            for c in cs.iter_mut() {
                *c = (theta.cos(), theta.sin());
                theta *= self.theta_scale;
            }
            cs
        };
        for head in x.chunks_exact_mut(self.head_dim) {
            for (p, &(cos, sin)) in head.chunks_exact_mut(2).zip(cs.iter()) {
                let (x0, x1) = (p[0], p[1]);
                p[0] = x0 * cos - x1 * sin;
                p[1] = x0 * sin + x1 * cos;
            }
        }
    }
}
