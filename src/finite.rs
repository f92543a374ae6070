//! Non-finite values (NaN, ±Inf) are refused where they enter: weights when a checkpoint is read
//! (`model::weights`), logits handed to `pocl kd-loss`, per-sample losses of the difficulty
//! measurer, and the training step's loss and gradient norm. A NaN that got past these points
//! would come out as a plausible number (a ROUGE of 0, a "hardest" sample, a finite loss), so
//! every check names what it found and where.

/// The first non-finite entry of a row-major `[rows, cols]` buffer, as (row, column, value).
pub fn first_non_finite(values: &[f32], cols: usize) -> Option<(usize, usize, f32)> {
    let i = values.iter().position(|x| !x.is_finite())?;
    let cols = cols.max(1);
    Some((i / cols, i % cols, values[i]))
}

/// How many entries of `values` are NaN or infinite.
pub fn count_non_finite(values: &[f32]) -> usize {
    values.iter().filter(|x| !x.is_finite()).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_row_and_column() {
        let v = [0.0, 1.0, 2.0, 3.0, f32::NAN, f32::INFINITY];
        let (r, c, x) = first_non_finite(&v, 3).unwrap();
        assert_eq!((r, c), (1, 1));
        assert!(x.is_nan());
        assert_eq!(count_non_finite(&v), 2);
        assert!(first_non_finite(&v[..4], 3).is_none());
        assert_eq!(count_non_finite(&[f32::NEG_INFINITY]), 1);
    }
}
