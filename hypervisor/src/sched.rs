//! vCPU states and the round-robin choice of what runs next on a physical
//! CPU. vCPUs are pinned to a physical CPU; each CPU picks among its own.

/// Where a vCPU is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuState {
    /// Not started (secondary vCPUs before PSCI CPU_ON) or CPU_OFF.
    Off,
    Runnable,
    /// Executed WFI; runnable again when an interrupt is pending for it.
    Waiting,
    /// Its partition stopped.
    Stopped,
}

/// Picks the next vCPU on a CPU: the first runnable one after `current`
/// in `queue` order (wrapping), or `current` itself if it is still the only
/// runnable one. `runnable(i)` says whether vCPU `i` may run now.
pub fn pick_next(queue: &[usize], current: Option<usize>, runnable: impl Fn(usize) -> bool) -> Option<usize> {
    let start = current.and_then(|c| queue.iter().position(|&v| v == c)).map_or(0, |p| p + 1);
    (0..queue.len()).map(|k| queue[(start + k) % queue.len()]).find(|&v| runnable(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_and_fallbacks() {
        let q = [3, 5, 7];
        assert_eq!(pick_next(&q, None, |_| true), Some(3));
        assert_eq!(pick_next(&q, Some(3), |_| true), Some(5));
        assert_eq!(pick_next(&q, Some(7), |_| true), Some(3));
        assert_eq!(pick_next(&q, Some(5), |v| v == 5), Some(5));
        assert_eq!(pick_next(&q, Some(5), |v| v == 3), Some(3));
        assert_eq!(pick_next(&q, Some(5), |_| false), None);
        assert_eq!(pick_next(&[], None, |_| true), None);
        // A current vCPU not in this queue starts from the front.
        assert_eq!(pick_next(&q, Some(9), |_| true), Some(3));
    }
}
