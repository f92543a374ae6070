//! A checked, safe front to the `gemm` crate (candle's own CPU matmul) for kernels that need
//! strided operands or accumulation into an existing buffer, which `Tensor::matmul` cannot do
//! without materialising transposes or fresh outputs.

/// A read-only strided matrix view: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// Row-major [rows, cols] with row stride `ld`.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize, ld: usize) -> Self {
        View {
            data,
            rows,
            cols,
            rs: ld,
            cs: 1,
        }
    }

    /// The transpose, as a view (no copy).
    pub fn t(self) -> Self {
        View {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// dst[m, n] (row-major, row stride `ldd`) = lhs[m, k] · rhs[k, n], or += when `accumulate`.
/// Multi-threaded on the global rayon pool.
pub fn matmul(lhs: View, rhs: View, dst: &mut [f32], ldd: usize, accumulate: bool) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "gemm: inner dimensions differ");
    assert!(lhs.fits() && rhs.fits(), "gemm: operand view out of bounds");
    assert!(
        m == 0 || n == 0 || (m - 1) * ldd + n <= dst.len(),
        "gemm: destination out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.chunks_mut(ldd).take(m).for_each(|r| r[..n].fill(0.0));
        }
        return;
    }
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every index the gemm touches lies inside the three slices (checked above: the last
    // element of each view and of the destination is in bounds, and strides are non-negative),
    // and `dst` is borrowed mutably, so it cannot alias the read-only operands.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ldd as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_products_and_accumulation() {
        // lhs [2, 3], rhs given transposed as [2, 3] (so rhs = its .t() is [3, 2]).
        let a = [1f32, 2., 3., 4., 5., 6.];
        let b = [1f32, 0., -1., 2., 1., 0.];
        let mut out = vec![0f32; 2 * 3];
        matmul(
            View::rows(&a, 2, 3, 3),
            View::rows(&b, 2, 3, 3).t(),
            &mut out,
            3,
            false,
        );
        // row 0: [1·1 + 2·0 + 3·(−1), 1·2 + 2·1 + 0] = [−2, 4]; row 1: [4 − 6, 8 + 5] = [−2, 13]
        assert_eq!(&out[..2], &[-2.0, 4.0]);
        assert_eq!(&out[3..5], &[-2.0, 13.0]);
        assert_eq!(out[2], 0.0, "columns beyond n are untouched");
        matmul(
            View::rows(&a, 2, 3, 3),
            View::rows(&b, 2, 3, 3).t(),
            &mut out,
            3,
            true,
        );
        assert_eq!(&out[3..5], &[-4.0, 26.0]);
    }
}
