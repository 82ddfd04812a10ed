//! The constant-velocity Kalman filter of SORT and ByteTrack, over a box's centre, aspect ratio
//! and height. It is stepped in frames of the source video (ByteTrack's noise is set per frame),
//! counted from the frames' timestamps, so a track keeps its speed when frames are skipped
//! (`stride`, `fps`).

/// Position noise per unit of box height, and velocity noise (ByteTrack's 1/20 and 1/160).
const POSITION_WEIGHT: f64 = 1.0 / 20.0;
const VELOCITY_WEIGHT: f64 = 1.0 / 160.0;

type Vector8 = [f64; 8];
type Matrix8 = [[f64; 8]; 8];
type Matrix4 = [[f64; 4]; 4];

/// A box as the filter sees it: centre x, centre y, width / height, height.
pub type Measurement = [f64; 4];

/// The state of one track: the mean of (measurement, its velocity per step) and its covariance.
#[derive(Debug, Clone)]
pub struct KalmanState {
    mean: Vector8,
    covariance: Matrix8,
}

impl KalmanState {
    /// A track first seen at `z`, with unknown velocity.
    pub fn new(z: Measurement) -> KalmanState {
        let h = z[3];
        let std = [
            2.0 * POSITION_WEIGHT * h,
            2.0 * POSITION_WEIGHT * h,
            1e-2,
            2.0 * POSITION_WEIGHT * h,
            10.0 * VELOCITY_WEIGHT * h,
            10.0 * VELOCITY_WEIGHT * h,
            1e-5,
            10.0 * VELOCITY_WEIGHT * h,
        ];
        let mut covariance = [[0.0; 8]; 8];
        for (i, s) in std.iter().enumerate() {
            covariance[i][i] = s * s;
        }
        KalmanState { mean: [z[0], z[1], z[2], z[3], 0.0, 0.0, 0.0, 0.0], covariance }
    }

    /// Where the box is expected `steps` steps later (a fraction or several: process noise grows
    /// with the time that passed).
    pub fn predict(&mut self, steps: f64) {
        let h = self.mean[3];
        for i in 0..4 {
            self.mean[i] += steps * self.mean[i + 4];
        }
        // P = F P Fᵀ + Q with F = [[I, dt I], [0, I]].
        let p = self.covariance;
        let mut next = [[0.0; 8]; 8];
        for (i, row) in next.iter_mut().enumerate() {
            for (j, value) in row.iter_mut().enumerate() {
                let f = |a: usize, b: usize| p[a][b] + if b < 4 { steps * p[a][b + 4] } else { 0.0 };
                *value = f(i, j) + if i < 4 { steps * f(i + 4, j) } else { 0.0 };
            }
        }
        let noise = [POSITION_WEIGHT * h, POSITION_WEIGHT * h, 1e-2, POSITION_WEIGHT * h, VELOCITY_WEIGHT * h, VELOCITY_WEIGHT * h, 1e-5, VELOCITY_WEIGHT * h];
        for (i, s) in noise.iter().enumerate() {
            next[i][i] += s * s * steps;
        }
        self.covariance = next;
    }

    /// Stops the box's height from changing: a box that is not seen does not keep growing or
    /// shrinking (as ByteTrack does for tracks it lost).
    pub fn stop_resizing(&mut self) {
        self.mean[7] = 0.0;
    }

    /// Corrects the state with a measured box.
    pub fn update(&mut self, z: Measurement) {
        let h = self.mean[3];
        let r = [POSITION_WEIGHT * h, POSITION_WEIGHT * h, 1e-1, POSITION_WEIGHT * h];
        // S = H P Hᵀ + R: the top-left block, plus the measurement noise.
        let mut s: Matrix4 = std::array::from_fn(|i| std::array::from_fn(|j| self.covariance[i][j]));
        for (i, noise) in r.iter().enumerate() {
            s[i][i] += noise * noise;
        }
        let Some(s_inv) = invert_spd4(&s) else { return };
        // K = P Hᵀ S⁻¹ (8x4): P Hᵀ is the first four columns of P.
        let mut gain = [[0.0; 4]; 8];
        for (i, row) in gain.iter_mut().enumerate() {
            for (j, value) in row.iter_mut().enumerate() {
                *value = (0..4).map(|k| self.covariance[i][k] * s_inv[k][j]).sum();
            }
        }
        let innovation: [f64; 4] = std::array::from_fn(|i| z[i] - self.mean[i]);
        for (i, mean) in self.mean.iter_mut().enumerate() {
            *mean += (0..4).map(|k| gain[i][k] * innovation[k]).sum::<f64>();
        }
        // P = P - K H P: K times the first four rows of P.
        let p = self.covariance;
        self.covariance = std::array::from_fn(|i| std::array::from_fn(|j| p[i][j] - (0..4).map(|k| gain[i][k] * p[k][j]).sum::<f64>()));
    }

    /// The box the state stands for, `[x1, y1, x2, y2]`.
    pub fn xyxy(&self) -> [f32; 4] {
        let [cx, cy, a, h] = [self.mean[0], self.mean[1], self.mean[2], self.mean[3]];
        let w = a * h;
        [(cx - w / 2.0) as f32, (cy - h / 2.0) as f32, (cx + w / 2.0) as f32, (cy + h / 2.0) as f32]
    }
}

/// `[x1, y1, x2, y2]` as the filter's measurement.
pub fn measurement(xyxy: [f32; 4]) -> Measurement {
    let [x1, y1, x2, y2] = xyxy.map(f64::from);
    let h = (y2 - y1).max(1e-3);
    [(x1 + x2) / 2.0, (y1 + y2) / 2.0, (x2 - x1).max(1e-3) / h, h]
}

/// The inverse of a symmetric positive-definite 4x4 matrix, through its Cholesky factor; `None`
/// when it is not positive definite (a degenerate box).
fn invert_spd4(m: &Matrix4) -> Option<Matrix4> {
    let mut l = [[0.0; 4]; 4];
    for i in 0..4 {
        for j in 0..=i {
            let sum: f64 = (0..j).map(|k| l[i][k] * l[j][k]).sum();
            if i == j {
                let d = m[i][i] - sum;
                if d <= 0.0 || !d.is_finite() {
                    return None;
                }
                l[i][j] = d.sqrt();
            } else {
                l[i][j] = (m[i][j] - sum) / l[j][j];
            }
        }
    }
    // Columns of the inverse: solve L Lᵀ x = e_c.
    let mut inverse = [[0.0; 4]; 4];
    for c in 0..4 {
        let mut y = [0.0; 4];
        for i in 0..4 {
            let e = if i == c { 1.0 } else { 0.0 };
            y[i] = (e - (0..i).map(|k| l[i][k] * y[k]).sum::<f64>()) / l[i][i];
        }
        let mut x = [0.0; 4];
        for i in (0..4).rev() {
            x[i] = (y[i] - (i + 1..4).map(|k| l[k][i] * x[k]).sum::<f64>()) / l[i][i];
        }
        for (row, value) in inverse.iter_mut().zip(x) {
            row[c] = value;
        }
    }
    Some(inverse)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inverse_times_the_matrix_is_the_identity() {
        let m = [[4.0, 1.0, 0.5, 0.0], [1.0, 3.0, 0.2, 0.1], [0.5, 0.2, 2.0, 0.3], [0.0, 0.1, 0.3, 1.0]];
        let inv = invert_spd4(&m).unwrap();
        for (i, row) in m.iter().enumerate() {
            for j in 0..4 {
                let product: f64 = row.iter().zip(&inv).map(|(a, inv_row)| a * inv_row[j]).sum();
                assert!((product - f64::from(u8::from(i == j))).abs() < 1e-12, "{i},{j}: {product}");
            }
        }
        assert!(invert_spd4(&[[0.0; 4]; 4]).is_none());
    }

    #[test]
    fn a_box_moving_at_constant_speed_is_followed_across_skipped_steps() {
        // 3 px per step to the right; measured every step, then predicted two steps ahead.
        let at = |t: f64| [100.0 + 3.0 * t as f32, 50.0, 140.0 + 3.0 * t as f32, 130.0];
        let mut state = KalmanState::new(measurement(at(0.0)));
        for t in 1..20 {
            state.predict(1.0);
            state.update(measurement(at(f64::from(t))));
        }
        state.predict(2.0);
        let predicted = state.xyxy();
        let expected = at(21.0);
        for (p, e) in predicted.iter().zip(expected) {
            assert!((p - e).abs() < 0.5, "{predicted:?} vs {expected:?}");
        }
    }
}
