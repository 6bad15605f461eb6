//! Makes naga's SPIR-V of a module under the Vulkan memory model order its
//! memory accesses the way its WGSL says.
//!
//! naga declares the Vulkan memory model for every module that uses
//! cooperative matrices (`SPV_KHR_cooperative_matrix` requires it), but
//! writes the module's loads, stores and barriers as it would under
//! GLSL450. Under the Vulkan model that changes their meaning:
//!   - a load or store without the `NonPrivatePointer` memory operand is
//!     *private*: barriers do not order it against other invocations, so a
//!     compiler may keep a workgroup-memory value in registers across a
//!     `workgroupBarrier()` or move the access past it;
//!   - a barrier without `MakeAvailable` / `MakeVisible` in its semantics
//!     performs no availability or visibility operation: the writes it
//!     releases need not be seen by the invocations it acquires;
//!   - a barrier or atomic at `Device` scope needs the
//!     `VulkanMemoryModelDeviceScope` capability (naga's `storageBarrier()`
//!     uses it without declaring it: spirv-val rejects the module).
//!
//! Known upstream (gfx-rs/wgpu#8805, a fix proposed in #10016); wgpu 30
//! ships without it. A kernel that hands data between invocations through
//! workgroup memory (every tiled attention kernel does) is then correct on
//! a driver only by the driver's grace: lavapipe runs it right; an H100's
//! driver gave NaN in some rows of the cooperative-matrix forward, in rows
//! that changed from run to run (2026-12-05, BENCHMARKS.md).
//!
//! [`follow_vulkan_memory_model`] rewrites the words: every load and store
//! through a `Workgroup` or `StorageBuffer` pointer (cooperative-matrix
//! loads and stores included) gains `NonPrivatePointer`; every barrier
//! with acquire/release semantics gains `MakeAvailable | MakeVisible`
//! (through new constants: naga shares its integer constants between
//! barriers and arithmetic); the module declares
//! `VulkanMemoryModelDeviceScope` (wgpu enables the device feature with
//! cooperative matrices). Modules under GLSL450 come back unchanged.

use std::collections::{HashMap, HashSet};

/// Why the words could not be rewritten (they are not the SPIR-V naga
/// writes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpirvRewriteError {
    /// Fewer words than a header, or the wrong magic number.
    #[error("not a SPIR-V module (no header)")]
    NoHeader,
    /// An instruction's word count runs past the end or is zero.
    #[error("instruction at word {at} has a word count of {count}, past the module's {len} words")]
    Truncated {
        /// The instruction's first word.
        at: usize,
        /// The word count it gives.
        count: usize,
        /// The module's length in words.
        len: usize,
    },
    /// An access the rewrite cannot mark (e.g. a cooperative-matrix load
    /// without a stride operand, which a memory operand must follow).
    #[error("{what} at word {at} cannot take a memory operand")]
    Unmarkable {
        /// The instruction.
        what: &'static str,
        /// Its first word.
        at: usize,
    },
    /// A barrier's semantics are not a 32-bit integer constant.
    #[error("the barrier at word {at} takes its semantics from id {id}, not an integer constant")]
    DynamicSemantics {
        /// The barrier's first word.
        at: usize,
        /// The semantics operand.
        id: u32,
    },
}

const MAGIC: u32 = 0x0723_0203;
const HEADER_WORDS: usize = 5;
/// The header word holding the id bound (every id is below it).
const BOUND: usize = 3;

mod op {
    pub const CAPABILITY: u16 = 17;
    pub const MEMORY_MODEL: u16 = 14;
    pub const TYPE_INT: u16 = 21;
    pub const TYPE_POINTER: u16 = 32;
    pub const CONSTANT: u16 = 43;
    pub const LOAD: u16 = 61;
    pub const STORE: u16 = 62;
    pub const COPY_MEMORY: u16 = 63;
    pub const COPY_MEMORY_SIZED: u16 = 64;
    pub const CONTROL_BARRIER: u16 = 224;
    pub const MEMORY_BARRIER: u16 = 225;
    pub const COOPERATIVE_MATRIX_LOAD: u16 = 4457;
    pub const COOPERATIVE_MATRIX_STORE: u16 = 4458;
}

const MEMORY_MODEL_VULKAN: u32 = 3;
const CAPABILITY_DEVICE_SCOPE: u32 = 5346;
const STORAGE_WORKGROUP: u32 = 4;
const STORAGE_STORAGE_BUFFER: u32 = 12;
/// Memory access operand bit.
const NON_PRIVATE_POINTER: u32 = 0x20;
/// Memory semantics bits.
const ACQUIRE: u32 = 0x2;
const RELEASE: u32 = 0x4;
const ACQUIRE_RELEASE: u32 = 0x8;
const MAKE_AVAILABLE: u32 = 0x2000;
const MAKE_VISIBLE: u32 = 0x4000;

/// One instruction: its first word's index and its words.
struct Instruction<'a> {
    at: usize,
    words: &'a [u32],
}

impl Instruction<'_> {
    fn opcode(&self) -> u16 {
        (self.words[0] & 0xffff) as u16
    }
}

fn instructions(words: &[u32]) -> Result<Vec<Instruction<'_>>, SpirvRewriteError> {
    let mut out = Vec::new();
    let mut at = HEADER_WORDS;
    while at < words.len() {
        let count = (words[at] >> 16) as usize;
        if count == 0 || at + count > words.len() {
            return Err(SpirvRewriteError::Truncated {
                at,
                count,
                len: words.len(),
            });
        }
        out.push(Instruction {
            at,
            words: &words[at..at + count],
        });
        at += count;
    }
    Ok(out)
}

/// Whether `words` declare the Vulkan memory model.
pub fn uses_vulkan_memory_model(words: &[u32]) -> bool {
    words.len() >= HEADER_WORDS
        && words[0] == MAGIC
        && instructions(words).is_ok_and(|list| declares_vulkan_model(&list))
}

fn declares_vulkan_model(list: &[Instruction<'_>]) -> bool {
    list.iter()
        .any(|i| i.opcode() == op::MEMORY_MODEL && i.words.get(2) == Some(&MEMORY_MODEL_VULKAN))
}

/// `words` (a SPIR-V module as naga writes it) with its memory accesses
/// and barriers ordered as the Vulkan memory model requires (see the
/// module's documentation); unchanged unless the module declares that
/// model.
pub fn follow_vulkan_memory_model(words: &[u32]) -> Result<Vec<u32>, SpirvRewriteError> {
    if words.len() < HEADER_WORDS || words[0] != MAGIC {
        return Err(SpirvRewriteError::NoHeader);
    }
    let list = instructions(words)?;
    if !declares_vulkan_model(&list) {
        return Ok(words.to_vec());
    }
    let shared_pointers = shared_pointers(&list);
    // 32-bit integer constants by id.
    let int32_types: HashSet<u32> = list
        .iter()
        .filter(|i| i.opcode() == op::TYPE_INT && i.words.get(2) == Some(&32))
        .map(|i| i.words[1])
        .collect();
    let constants: HashMap<u32, u32> = list
        .iter()
        .filter(|i| i.opcode() == op::CONSTANT && i.words.len() == 4)
        .filter(|i| int32_types.contains(&i.words[1]))
        .map(|i| (i.words[2], i.words[3]))
        .collect();

    let mut bound = words[BOUND];
    // Semantics constants that need the availability bits: old id -> new.
    let mut semantics: HashMap<u32, (u32, u32)> = HashMap::new();
    let mut out: Vec<u32> = words[..HEADER_WORDS].to_vec();
    let mut rewritten: Vec<Vec<u32>> = Vec::with_capacity(list.len());
    let has_device_scope = list
        .iter()
        .any(|i| i.opcode() == op::CAPABILITY && i.words.get(1) == Some(&CAPABILITY_DEVICE_SCOPE));
    for i in &list {
        let mut w = i.words.to_vec();
        let marked = |w: &mut Vec<u32>, pointer: usize, mask: usize, what| {
            if !shared_pointers.contains(&w[pointer]) {
                return Ok(());
            }
            mark_non_private(w, mask).ok_or(SpirvRewriteError::Unmarkable { what, at: i.at })
        };
        match i.opcode() {
            // OpLoad: type, result, pointer, [access].
            op::LOAD => marked(&mut w, 3, 4, "OpLoad")?,
            // OpStore: pointer, object, [access].
            op::STORE => marked(&mut w, 1, 3, "OpStore")?,
            // Loads: type, result, pointer, layout, [stride], [access];
            // stores: pointer, object, layout, [stride], [access]. The
            // access operand needs the stride before it.
            op::COOPERATIVE_MATRIX_LOAD => marked(&mut w, 3, 6, "OpCooperativeMatrixLoadKHR")?,
            op::COOPERATIVE_MATRIX_STORE => marked(&mut w, 1, 5, "OpCooperativeMatrixStoreKHR")?,
            // naga writes neither; a copy between shared memories would
            // need both of its access operands marked.
            op::COPY_MEMORY | op::COPY_MEMORY_SIZED
                if shared_pointers.contains(&w[1]) || shared_pointers.contains(&w[2]) =>
            {
                return Err(SpirvRewriteError::Unmarkable {
                    what: "OpCopyMemory",
                    at: i.at,
                });
            }
            op::CONTROL_BARRIER | op::MEMORY_BARRIER => {
                let slot = w.len() - 1;
                let id = w[slot];
                let &value = constants
                    .get(&id)
                    .ok_or(SpirvRewriteError::DynamicSemantics { at: i.at, id })?;
                // Releases make their writes available, acquires make
                // others' visible (naga's barriers do both).
                let mut ordered = value;
                if value & (RELEASE | ACQUIRE_RELEASE) != 0 {
                    ordered |= MAKE_AVAILABLE;
                }
                if value & (ACQUIRE | ACQUIRE_RELEASE) != 0 {
                    ordered |= MAKE_VISIBLE;
                }
                if ordered != value {
                    let (new_id, _) = *semantics.entry(id).or_insert_with(|| {
                        let fresh = bound;
                        bound += 1;
                        (fresh, ordered)
                    });
                    w[slot] = new_id;
                }
            }
            _ => {}
        }
        rewritten.push(w);
    }
    let mut declare_device_scope = !has_device_scope;
    for w in &rewritten {
        let opcode = (w[0] & 0xffff) as u16;
        out.extend_from_slice(w);
        // The device-scope capability after the module's first capability.
        if opcode == op::CAPABILITY && declare_device_scope {
            out.extend_from_slice(&[
                (2 << 16) | u32::from(op::CAPABILITY),
                CAPABILITY_DEVICE_SCOPE,
            ]);
            declare_device_scope = false;
        }
        // Each new semantics constant right after the one it extends
        // (its type is declared before both).
        if opcode == op::CONSTANT
            && w.len() == 4
            && let Some(&(new_id, value)) = semantics.get(&w[2])
        {
            out.extend_from_slice(&[(4 << 16) | u32::from(op::CONSTANT), w[1], new_id, value]);
        }
    }
    out[BOUND] = bound;
    Ok(out)
}

/// Adds `NonPrivatePointer` to the access operand at `mask` (appending one
/// when the instruction ends there); `None` when the instruction is too
/// short for the operand to follow its optional predecessors.
fn mark_non_private(w: &mut Vec<u32>, mask: usize) -> Option<()> {
    match w.len().cmp(&mask) {
        std::cmp::Ordering::Less => None,
        std::cmp::Ordering::Equal => {
            w.push(NON_PRIVATE_POINTER);
            w[0] += 1 << 16;
            Some(())
        }
        std::cmp::Ordering::Greater => {
            w[mask] |= NON_PRIVATE_POINTER;
            Some(())
        }
    }
}

/// The ids of pointers into memory other invocations share: of a pointer
/// type into `Workgroup` or `StorageBuffer` (variables, access chains,
/// parameters, copies).
fn shared_pointers(list: &[Instruction<'_>]) -> HashSet<u32> {
    let types: HashSet<u32> = list
        .iter()
        .filter(|i| i.opcode() == op::TYPE_POINTER && i.words.len() >= 4)
        .filter(|i| matches!(i.words[2], STORAGE_WORKGROUP | STORAGE_STORAGE_BUFFER))
        .map(|i| i.words[1])
        .collect();
    list.iter()
        .filter(|i| has_result_type(i.opcode()) && i.words.len() >= 3)
        .filter(|i| types.contains(&i.words[1]))
        .map(|i| i.words[2])
        .collect()
}

/// Whether instructions of `opcode` start with a result type and a result
/// id (the ones that can produce a pointer into shared memory).
fn has_result_type(opcode: u16) -> bool {
    // OpVariable, OpFunctionParameter, the access chains, OpCopyObject,
    // OpSelect, OpPhi, OpLoad (of a variable pointer), OpFunctionCall.
    matches!(opcode, 59 | 55 | 65 | 66 | 67 | 83 | 169 | 245 | 61 | 57)
}

/// What in `words` breaks the Vulkan memory model's ordering of the
/// kernel's hand-overs (empty for words [`follow_vulkan_memory_model`]
/// wrote): an access through a shared pointer without `NonPrivatePointer`,
/// an acquiring or releasing barrier without visibility or availability,
/// no device-scope capability, an id past the bound. Read independently of
/// the rewrite's own bookkeeping, for the tests.
#[cfg(test)]
pub(crate) fn memory_model_violations(words: &[u32]) -> Vec<String> {
    let list = instructions(words).expect("well-formed words");
    let mut problems = Vec::new();
    let pointers = shared_pointers(&list);
    let values: HashMap<u32, u32> = list
        .iter()
        .filter(|i| i.opcode() == op::CONSTANT && i.words.len() == 4)
        .map(|i| (i.words[2], i.words[3]))
        .collect();
    let bound = words[BOUND];
    for i in &list {
        let w = i.words;
        if has_result_type(i.opcode()) && w.len() >= 3 && w[2] >= bound {
            problems.push(format!(
                "id {} at word {} is past the bound {bound}",
                w[2], i.at
            ));
        }
        let (pointer, mask) = match i.opcode() {
            op::LOAD => (w[3], w.get(4)),
            op::STORE => (w[1], w.get(3)),
            op::COOPERATIVE_MATRIX_LOAD => (w[3], w.get(6)),
            op::COOPERATIVE_MATRIX_STORE => (w[1], w.get(5)),
            op::CONTROL_BARRIER | op::MEMORY_BARRIER => {
                let value = values[&w[w.len() - 1]];
                let releases = value & (RELEASE | ACQUIRE_RELEASE) != 0;
                let acquires = value & (ACQUIRE | ACQUIRE_RELEASE) != 0;
                if (releases && value & MAKE_AVAILABLE == 0)
                    || (acquires && value & MAKE_VISIBLE == 0)
                {
                    problems.push(format!("barrier at word {} has semantics {value:#x}", i.at));
                }
                continue;
            }
            _ => continue,
        };
        if pointers.contains(&pointer) && mask.is_none_or(|m| m & NON_PRIVATE_POINTER == 0) {
            problems.push(format!(
                "a private access (opcode {}) at word {}",
                i.opcode(),
                i.at
            ));
        }
    }
    let vulkan = declares_vulkan_model(&list);
    let device_scope = list
        .iter()
        .any(|i| i.opcode() == op::CAPABILITY && i.words[1] == CAPABILITY_DEVICE_SCOPE);
    if vulkan && !device_scope {
        problems.push("no VulkanMemoryModelDeviceScope capability".to_string());
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instruction(opcode: u16, operands: &[u32]) -> Vec<u32> {
        let mut w = vec![((operands.len() as u32 + 1) << 16) | u32::from(opcode)];
        w.extend_from_slice(operands);
        w
    }

    /// A small module: a workgroup array read with an `Aligned` operand, a
    /// stored value, a barrier whose semantics constant (0x108:
    /// AcquireRelease | WorkgroupMemory) is also an addend, a matrix load
    /// with a stride and one without, a private (function) variable.
    fn module(memory_model: u32, matrix_load_stride: bool) -> Vec<u32> {
        let mut w = vec![MAGIC, 0x0001_0600, 0, 40, 0];
        w.extend(instruction(op::CAPABILITY, &[1]));
        w.extend(instruction(op::MEMORY_MODEL, &[0, memory_model]));
        w.extend(instruction(op::TYPE_INT, &[1, 32, 0]));
        w.extend(instruction(op::CONSTANT, &[1, 2, 0x108]));
        w.extend(instruction(op::CONSTANT, &[1, 3, 2]));
        w.extend(instruction(op::TYPE_POINTER, &[4, STORAGE_WORKGROUP, 1]));
        w.extend(instruction(op::TYPE_POINTER, &[5, 7, 1]));
        w.extend(instruction(59, &[4, 6, STORAGE_WORKGROUP]));
        w.extend(instruction(59, &[5, 7, 7]));
        w.extend(instruction(65, &[4, 8, 6, 3]));
        w.extend(instruction(op::LOAD, &[1, 9, 8, 0x2, 4]));
        w.extend(instruction(op::STORE, &[6, 9]));
        w.extend(instruction(op::STORE, &[7, 9]));
        w.extend(instruction(op::CONTROL_BARRIER, &[3, 3, 2]));
        w.extend(instruction(128, &[1, 10, 9, 2]));
        let stride: &[u32] = if matrix_load_stride { &[3] } else { &[] };
        w.extend(instruction(
            op::COOPERATIVE_MATRIX_LOAD,
            &[[1, 11, 8, 3].as_slice(), stride].concat(),
        ));
        w
    }

    #[test]
    fn accesses_and_barriers_are_marked_and_shared_constants_kept() {
        let before = module(MEMORY_MODEL_VULKAN, true);
        assert_eq!(
            memory_model_violations(&before).len(),
            5,
            "{:?}",
            memory_model_violations(&before)
        );
        let after = follow_vulkan_memory_model(&before).unwrap();
        assert_eq!(memory_model_violations(&after), Vec::<String>::new());
        let list = instructions(&after).unwrap();
        let find = |opcode: u16| list.iter().filter(move |i| i.opcode() == opcode);
        // The aligned load keeps its alignment literal.
        let load = find(op::LOAD).next().unwrap();
        assert_eq!(load.words[3..], [8, 0x2 | NON_PRIVATE_POINTER, 4]);
        // The workgroup store is marked, the function-variable one not.
        let stores: Vec<&[u32]> = find(op::STORE).map(|i| i.words).collect();
        assert_eq!(stores[0][1..], [6, 9, NON_PRIVATE_POINTER]);
        assert_eq!(stores[1][1..], [7, 9]);
        // The barrier takes a new constant; the addend keeps the old one.
        let barrier = find(op::CONTROL_BARRIER).next().unwrap();
        assert_eq!(barrier.words[3], 40);
        let constants: Vec<&[u32]> = find(op::CONSTANT).map(|i| i.words).collect();
        assert!(constants.contains(&[4 << 16 | 43, 1, 2, 0x108].as_slice()));
        assert!(
            constants
                .contains(&[4 << 16 | 43, 1, 40, 0x108 | MAKE_AVAILABLE | MAKE_VISIBLE].as_slice())
        );
        assert_eq!(find(128).next().unwrap().words[4], 2);
        let matrix = find(op::COOPERATIVE_MATRIX_LOAD).next().unwrap();
        assert_eq!(matrix.words[5..], [3, NON_PRIVATE_POINTER]);
        assert_eq!(after[BOUND], 41);
        assert_eq!(
            find(op::CAPABILITY).map(|i| i.words[1]).collect::<Vec<_>>(),
            [1, CAPABILITY_DEVICE_SCOPE]
        );
    }

    #[test]
    fn modules_under_glsl450_are_left_alone_and_unmarkable_accesses_refused() {
        let glsl450 = module(1, true);
        assert_eq!(follow_vulkan_memory_model(&glsl450).unwrap(), glsl450);
        assert!(!uses_vulkan_memory_model(&glsl450));
        let no_stride = module(MEMORY_MODEL_VULKAN, false);
        assert!(matches!(
            follow_vulkan_memory_model(&no_stride),
            Err(SpirvRewriteError::Unmarkable {
                what: "OpCooperativeMatrixLoadKHR",
                ..
            })
        ));
        let mut truncated = module(MEMORY_MODEL_VULKAN, true);
        truncated.pop();
        assert!(matches!(
            follow_vulkan_memory_model(&truncated),
            Err(SpirvRewriteError::Truncated { .. })
        ));
        assert_eq!(
            follow_vulkan_memory_model(&[1, 2]),
            Err(SpirvRewriteError::NoHeader)
        );
    }
}
