//! Kernel modules for the initramfs: the board's module names resolved to
//! `.ko` files in the root tree, with their dependencies, in load order.
//!
//! Dependencies come from `modules.dep` when the kernel package ships one;
//! Debian's packages do not (depmod runs at install time), so otherwise they
//! come from each module's ELF `.modinfo` section: `depends=` (hard, must
//! exist) and `softdep=pre: ...` (loaded first when present, as modprobe
//! does; tokens outside a `pre:`/`post:` group are ignored, as kmod does).
//! Built-in modules (`modules.builtin`) are satisfied without a file.
//!
//! A soft dependency may name an alias rather than a module (ext4's `pre:
//! crc32c`, provided by `crc32c_generic` or an accelerated one): it is looked
//! up in the aliases of `modules.alias` when the kernel package ships one and
//! in those of the built-ins (`modules.builtin.modinfo`); without
//! `modules.alias` (Debian's), in the `alias=` of the modules named
//! `<alias>_...` ([`providers_by_name`]). One found nowhere is
//! left out, as modprobe leaves it out, and said in [`Resolved::warnings`]:
//! the module may fail at use without it (ext4 mounts fail with ENOENT).
//!
//! Never executes or loads anything: it only reads bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use basalt_rootfs::tree::{EntryKind, Tree};

#[derive(Debug, thiserror::Error)]
pub enum ModulesError {
    #[error("no kernel modules directory {dir}/<version>/ in the root tree")]
    NoModulesDir { dir: String },
    #[error(
        "several kernel versions under {dir}/ ({found}) and none matches the kernel file {kernel}"
    )]
    AmbiguousVersion {
        dir: String,
        found: String,
        kernel: String,
    },
    #[error(
        "module {name:?} (needed by {needed_by}) is neither a .ko file under {dir} nor built in"
    )]
    NotFound {
        name: String,
        needed_by: String,
        dir: String,
    },
    #[error("cannot read module {path}: {err}")]
    Read { path: String, err: std::io::Error },
    #[error("module {path}: {why}")]
    Elf { path: String, why: String },
    #[error("module dependency cycle through {name}")]
    Cycle { name: String },
    #[error("{file}: line {line}: {why}")]
    DepFile {
        file: String,
        line: usize,
        why: String,
    },
}

/// Module names compare with `-` and `_` as the same character.
pub fn canonical_name(name: &str) -> String {
    name.replace('-', "_")
}

/// Find a section by name in an ELF32/ELF64 file of either endianness.
pub fn elf_section<'a>(data: &'a [u8], want: &str) -> Result<Option<&'a [u8]>, String> {
    if data.len() < 0x34 || &data[..4] != b"\x7fELF" {
        return Err("not an ELF file".into());
    }
    let is64 = match data[4] {
        1 => false,
        2 => true,
        c => return Err(format!("unknown ELF class {c}")),
    };
    let le = match data[5] {
        1 => true,
        2 => false,
        d => return Err(format!("unknown ELF data encoding {d}")),
    };
    let rd = |off: usize, n: usize| -> Result<u64, String> {
        let b = data
            .get(off..off + n)
            .ok_or_else(|| format!("truncated ELF at byte {off}"))?;
        let mut v: u64 = 0;
        for i in 0..n {
            let byte = if le { b[n - 1 - i] } else { b[i] };
            v = (v << 8) | u64::from(byte);
        }
        Ok(v)
    };
    let to_usize = |v: u64| usize::try_from(v).map_err(|_| "ELF offset too large".to_string());
    let (shoff, shentsize, shnum, shstrndx) = if is64 {
        (rd(0x28, 8)?, rd(0x3A, 2)?, rd(0x3C, 2)?, rd(0x3E, 2)?)
    } else {
        (rd(0x20, 4)?, rd(0x2E, 2)?, rd(0x30, 2)?, rd(0x32, 2)?)
    };
    let (shoff, shentsize) = (to_usize(shoff)?, to_usize(shentsize)?);
    // (name offset, file offset, size) of section i
    let section = |i: usize| -> Result<(u64, usize, usize), String> {
        let base = shoff + i * shentsize;
        if is64 {
            Ok((
                rd(base, 4)?,
                to_usize(rd(base + 0x18, 8)?)?,
                to_usize(rd(base + 0x20, 8)?)?,
            ))
        } else {
            Ok((
                rd(base, 4)?,
                to_usize(rd(base + 0x10, 4)?)?,
                to_usize(rd(base + 0x14, 4)?)?,
            ))
        }
    };
    let (_, stroff, strsize) = section(to_usize(shstrndx)?)?;
    let strtab = data
        .get(stroff..stroff + strsize)
        .ok_or("section name table outside the file")?;
    for i in 0..to_usize(shnum)? {
        let (name_off, off, size) = section(i)?;
        let name_off = to_usize(name_off)?;
        let Some(rest) = strtab.get(name_off..) else {
            continue;
        };
        let name = rest.split(|&b| b == 0).next().unwrap_or_default();
        if name == want.as_bytes() {
            return data
                .get(off..off + size)
                .map(Some)
                .ok_or_else(|| format!("section {want} outside the file"));
        }
    }
    Ok(None)
}

/// What a module's `.modinfo` says about its dependencies.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ModInfo {
    pub depends: Vec<String>,
    pub softdep_pre: Vec<String>,
    /// Its plain `alias=` names (canonical; patterns skipped): what a soft
    /// dependency of another module may call it.
    pub aliases: Vec<String>,
}

/// Parse `.modinfo` (NUL-separated `key=value` strings).
pub fn parse_modinfo(section: &[u8]) -> ModInfo {
    let mut info = ModInfo::default();
    for item in section.split(|&b| b == 0) {
        let s = String::from_utf8_lossy(item);
        if let Some(v) = s.strip_prefix("depends=") {
            info.depends
                .extend(v.split(',').filter(|x| !x.is_empty()).map(canonical_name));
        } else if let Some(v) = s.strip_prefix("alias=") {
            if !v.contains(['*', '?', '[']) {
                info.aliases.push(canonical_name(v));
            }
        } else if let Some(v) = s.strip_prefix("softdep=") {
            let mut in_pre = false;
            for tok in v.split_whitespace() {
                match tok {
                    "pre:" => in_pre = true,
                    "post:" => in_pre = false,
                    t if in_pre => info.softdep_pre.push(canonical_name(t)),
                    _ => {}
                }
            }
        }
    }
    info
}

/// The modules chosen for the initramfs.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub kernel_version: String,
    /// Paths relative to `<modules_dir>/<kernel_version>/`, in load order.
    pub order: Vec<PathBuf>,
    /// For each module of `order` and `late` that needs others first (its
    /// `depends=` and the `softdep=pre:` present), those modules, same form:
    /// stage 1 loads modules concurrently, each after these.
    pub deps: BTreeMap<PathBuf, Vec<PathBuf>>,
    /// The board's late modules and those of their dependencies not in
    /// `order`, same form, in load order after `order` ([`with_late`]).
    pub late: Vec<PathBuf>,
    /// Soft dependencies found nowhere (no module, alias or built-in), each
    /// naming the module that wants it: for the build's output.
    pub warnings: Vec<String>,
}

/// Pick the kernel version directory: the only one, or the one named in the
/// kernel file's name (`vmlinuz-<version>`).
pub fn kernel_version(
    tree: &Tree,
    modules_dir: &str,
    kernel: &Path,
) -> Result<String, ModulesError> {
    let dir = Path::new(modules_dir);
    let versions: Vec<String> = tree
        .iter()
        .filter(|(p, e)| e.is_dir() && p.parent() == Some(dir))
        .filter_map(|(p, _)| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    match versions.as_slice() {
        [] => Err(ModulesError::NoModulesDir {
            dir: modules_dir.into(),
        }),
        [one] => Ok(one.clone()),
        many => {
            let kname = kernel
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            many.iter()
                .find(|v| kname.ends_with(v.as_str()))
                .cloned()
                .ok_or_else(|| ModulesError::AmbiguousVersion {
                    dir: modules_dir.into(),
                    found: many.join(", "),
                    kernel: kernel.display().to_string(),
                })
        }
    }
}

/// Where a module's dependencies come from.
pub trait DepSource {
    /// Hard dependencies and `pre:` soft dependencies of the module at `rel`.
    fn deps(&self, rel: &Path) -> Result<ModInfo, ModulesError>;
}

/// Dependencies read from each module's `.modinfo` in the tree.
pub struct ModinfoDeps<'a> {
    pub tree: &'a Tree,
    pub base: PathBuf,
}

impl DepSource for ModinfoDeps<'_> {
    fn deps(&self, rel: &Path) -> Result<ModInfo, ModulesError> {
        let path = self.base.join(rel);
        let shown = path.display().to_string();
        let data = match self.tree.get(&path).map(|e| &e.kind) {
            Some(EntryKind::File(d)) => d.read().map_err(|err| ModulesError::Read {
                path: shown.clone(),
                err,
            })?,
            _ => {
                return Err(ModulesError::Read {
                    path: shown,
                    err: std::io::Error::other("not a regular file in the root tree"),
                });
            }
        };
        let data = decompress(&path, data)?;
        let sec = elf_section(&data, ".modinfo")
            .map_err(|why| ModulesError::Elf {
                path: shown.clone(),
                why,
            })?
            .ok_or_else(|| ModulesError::Elf {
                path: shown,
                why: "no .modinfo section".into(),
            })?;
        Ok(parse_modinfo(sec))
    }
}

/// Dependencies from a `modules.dep` file (`kernel/a.ko: kernel/b.ko ...`).
pub struct DepFile {
    pub deps: BTreeMap<PathBuf, Vec<PathBuf>>,
}

impl DepFile {
    pub fn parse(text: &str, file: &str) -> Result<DepFile, ModulesError> {
        let mut deps = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (m, d) = line.split_once(':').ok_or_else(|| ModulesError::DepFile {
                file: file.into(),
                line: i + 1,
                why: "no `:`".into(),
            })?;
            deps.insert(
                PathBuf::from(m.trim()),
                d.split_whitespace().map(PathBuf::from).collect(),
            );
        }
        Ok(DepFile { deps })
    }
}

impl DepSource for DepFile {
    fn deps(&self, rel: &Path) -> Result<ModInfo, ModulesError> {
        // modules.dep names files; turn them back into names for the resolver.
        Ok(ModInfo {
            depends: self
                .deps
                .get(rel)
                .map(|v| v.iter().map(|p| module_name(p)).collect())
                .unwrap_or_default(),
            softdep_pre: Vec::new(),
            aliases: Vec::new(),
        })
    }
}

/// Module name of a `.ko` path.
pub fn module_name(p: &Path) -> String {
    let f = p
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let f = strip_compression(&f);
    canonical_name(f.strip_suffix(".ko").unwrap_or(f))
}

/// Suffixes of compressed modules, as kmod knows them (Alpine ships `.ko.gz`).
pub const COMPRESSED: &[&str] = &[".gz", ".xz", ".zst"];

fn strip_compression(f: &str) -> &str {
    COMPRESSED
        .iter()
        .find_map(|c| f.strip_suffix(c).filter(|s| s.ends_with(".ko")))
        .unwrap_or(f)
}

/// Whether `rel` names a module file: `.ko`, `.ko.gz`, `.ko.xz` or `.ko.zst`.
pub fn is_module_file(rel: &Path) -> bool {
    rel.file_name()
        .map(|n| strip_compression(&n.to_string_lossy()).ends_with(".ko"))
        .unwrap_or(false)
}

/// Where a module goes in the initramfs: compressed modules are stored
/// decompressed (`x.ko.gz` → `x.ko`), so stage 1 loads them on any kernel,
/// with or without `CONFIG_MODULE_DECOMPRESS`.
pub fn initramfs_path(rel: &Path) -> PathBuf {
    let name = rel
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    rel.with_file_name(strip_compression(&name))
}

/// A module's ELF bytes: `data` decompressed according to `rel`'s suffix.
pub fn decompress(rel: &Path, data: Vec<u8>) -> Result<Vec<u8>, ModulesError> {
    use std::io::Read;
    let shown = rel.display().to_string();
    let name = rel.to_string_lossy();
    let err = |e: std::io::Error| ModulesError::Read {
        path: shown.clone(),
        err: std::io::Error::new(e.kind(), format!("decompressing: {e}")),
    };
    let mut out = Vec::new();
    if name.ends_with(".ko.gz") {
        flate2::read::GzDecoder::new(&data[..])
            .read_to_end(&mut out)
            .map_err(err)?;
    } else if name.ends_with(".ko.xz") {
        liblzma::read::XzDecoder::new(&data[..])
            .read_to_end(&mut out)
            .map_err(err)?;
    } else if name.ends_with(".ko.zst") {
        out = zstd::stream::decode_all(&data[..]).map_err(err)?;
    } else {
        return Ok(data);
    }
    Ok(out)
}

/// Modules in load order, and what each needs loaded first ([`Resolved`]).
pub type Ordered = (Vec<PathBuf>, BTreeMap<PathBuf, Vec<PathBuf>>);

/// Resolve `wanted` (names) to files in dependency order, with each one's
/// dependencies among them. `index` maps names to paths; `builtin` holds
/// names compiled into the kernel.
pub fn order(
    wanted: &[String],
    index: &BTreeMap<String, PathBuf>,
    builtin: &BTreeSet<String>,
    deps: &dyn DepSource,
    dir_for_errors: &str,
) -> Result<Ordered, ModulesError> {
    let w = order_with_aliases(
        wanted,
        index,
        builtin,
        &BTreeMap::new(),
        deps,
        dir_for_errors,
    )?;
    Ok((w.order, w.after))
}

/// [`order`]'s result with the soft dependencies found nowhere.
#[derive(Debug)]
pub struct Walked {
    pub order: Vec<PathBuf>,
    pub after: BTreeMap<PathBuf, Vec<PathBuf>>,
    /// (soft dependency, the module that wants it), each once, sorted.
    pub missing_soft: BTreeSet<(String, String)>,
}

/// [`order`], with `aliases` (canonical alias -> the canonical names of the
/// modules that provide it) to look a soft dependency up in when it is no
/// module's name. Every provider is taken, as modprobe loads every module
/// an alias matches.
pub fn order_with_aliases(
    wanted: &[String],
    index: &BTreeMap<String, PathBuf>,
    builtin: &BTreeSet<String>,
    aliases: &BTreeMap<String, Vec<String>>,
    deps: &dyn DepSource,
    dir_for_errors: &str,
) -> Result<Walked, ModulesError> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    struct Walk<'a> {
        index: &'a BTreeMap<String, PathBuf>,
        builtin: &'a BTreeSet<String>,
        aliases: &'a BTreeMap<String, Vec<String>>,
        deps: &'a dyn DepSource,
        dir: &'a str,
        missing_soft: BTreeSet<(String, String)>,
        /// Aliases of the modules taken: a soft dependency on one of them
        /// is met, even if looked up before the module was reached.
        provided: BTreeSet<String>,
        marks: BTreeMap<String, Mark>,
        out: Vec<PathBuf>,
        after: BTreeMap<PathBuf, Vec<PathBuf>>,
    }
    impl Walk<'_> {
        fn visit(
            &mut self,
            name: &str,
            needed_by: &str,
            optional: bool,
        ) -> Result<(), ModulesError> {
            // A soft dependency naming an alias: the modules behind it.
            if optional
                && !self.index.contains_key(name)
                && let Some(providers) = self.aliases.get(name)
            {
                for m in providers {
                    self.visit(m, needed_by, true)?;
                }
                return Ok(());
            }
            match self.marks.get(name) {
                Some(Mark::Done) => return Ok(()),
                Some(Mark::Visiting) => {
                    return Err(ModulesError::Cycle { name: name.into() });
                }
                None => {}
            }
            let Some(rel) = self.index.get(name).cloned() else {
                if self.builtin.contains(name) {
                    self.marks.insert(name.into(), Mark::Done);
                    return Ok(());
                }
                if optional {
                    // Not marked: a later hard dependency on it still fails.
                    self.missing_soft.insert((name.into(), needed_by.into()));
                    return Ok(());
                }
                return Err(ModulesError::NotFound {
                    name: name.into(),
                    needed_by: needed_by.into(),
                    dir: self.dir.into(),
                });
            };
            self.marks.insert(name.into(), Mark::Visiting);
            let info = self.deps.deps(&rel)?;
            self.provided.extend(info.aliases.iter().cloned());
            for d in &info.softdep_pre {
                self.visit(d, name, true)?;
            }
            for d in &info.depends {
                self.visit(d, name, false)?;
            }
            // The ones that are module files (not built in, not an absent
            // soft dependency), each once.
            let mut after: Vec<PathBuf> = Vec::new();
            let soft = info
                .softdep_pre
                .iter()
                .flat_map(|d| match self.aliases.get(d) {
                    Some(ms) if !self.index.contains_key(d) => ms.as_slice(),
                    _ => std::slice::from_ref(d),
                });
            for d in soft.chain(&info.depends) {
                if let Some(p) = self.index.get(d)
                    && !after.contains(p)
                {
                    after.push(p.clone());
                }
            }
            if !after.is_empty() {
                self.after.insert(rel.clone(), after);
            }
            self.marks.insert(name.into(), Mark::Done);
            self.out.push(rel);
            Ok(())
        }
    }
    let mut w = Walk {
        index,
        builtin,
        aliases,
        deps,
        dir: dir_for_errors,
        missing_soft: BTreeSet::new(),
        provided: BTreeSet::new(),
        marks: BTreeMap::new(),
        out: Vec::new(),
        after: BTreeMap::new(),
    };
    for name in wanted {
        w.visit(&canonical_name(name), "the board", false)?;
    }
    let provided = w.provided;
    let mut missing_soft = w.missing_soft;
    missing_soft.retain(|(soft, _)| !provided.contains(soft));
    Ok(Walked {
        order: w.out,
        after: w.after,
        missing_soft,
    })
}

/// Aliases of the kernel's modules: `modules.alias` lines (`alias <alias>
/// <module>`) and the built-ins' `<module>.alias=<alias>` entries of
/// `modules.builtin.modinfo` (NUL-separated). Patterns (`*`, `?`, `[`) are
/// skipped: soft dependencies name plain aliases. Canonical names, each
/// alias's providers in the files' order, each once.
pub fn parse_aliases(modules_alias: &str, builtin_modinfo: &[u8]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut add = |a: &str, m: &str| {
        let ms = out.entry(canonical_name(a)).or_default();
        let m = canonical_name(m);
        if !ms.contains(&m) {
            ms.push(m);
        }
    };
    let plain = |a: &str| !a.contains(['*', '?', '[']);
    for line in modules_alias.lines() {
        let mut f = line.split_whitespace();
        if let (Some("alias"), Some(a), Some(m)) = (f.next(), f.next(), f.next())
            && plain(a)
        {
            add(a, m);
        }
    }
    for entry in builtin_modinfo.split(|b| *b == 0) {
        let entry = String::from_utf8_lossy(entry);
        if let Some((m, a)) = entry.split_once(".alias=")
            && plain(a)
            && !m.contains('=')
        {
            add(a, m);
        }
    }
    out
}

/// Providers of the soft dependencies in `missing` (alias, wanted by) when
/// the kernel package ships no `modules.alias` to look them up in (Debian's:
/// depmod writes it at install time) and no built-in or taken module has
/// them. The kernel names an algorithm's drivers after the algorithm
/// (`crct10dif_generic` and `crct10dif-pclmul` for crc_t10dif's `pre:
/// crct10dif`): the modules named `<alias>_...` are read, and those whose own
/// `alias=` is the soft dependency provide it. Reads a few files, not all of
/// the kernel's modules; one found this way is certain, one not found stays
/// a warning.
fn providers_by_name(
    missing: &BTreeSet<(String, String)>,
    index: &BTreeMap<String, PathBuf>,
    deps: &dyn DepSource,
) -> Result<BTreeMap<String, Vec<String>>, ModulesError> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let wanted: BTreeSet<&str> = missing.iter().map(|(a, _)| a.as_str()).collect();
    for alias in wanted {
        let prefix = format!("{alias}_");
        for (name, rel) in index.range(prefix.clone()..) {
            if !name.starts_with(&prefix) {
                break;
            }
            if deps.deps(rel)?.aliases.iter().any(|a| a == alias) {
                out.entry(alias.to_string()).or_default().push(name.clone());
            }
        }
    }
    Ok(out)
}

/// Resolve the board's modules against the root tree.
pub fn resolve(
    tree: &Tree,
    modules_dir: &str,
    kernel: &Path,
    wanted: &[String],
) -> Result<Resolved, ModulesError> {
    let kver = kernel_version(tree, modules_dir, kernel)?;
    let base = Path::new(modules_dir).join(&kver);
    let mut index = BTreeMap::new();
    for (p, e) in tree.iter() {
        if let (Ok(rel), EntryKind::File(_)) = (p.strip_prefix(&base), &e.kind)
            && is_module_file(rel)
        {
            // First one wins on a name clash, in sorted path order: deterministic.
            index
                .entry(module_name(rel))
                .or_insert_with(|| rel.to_path_buf());
        }
    }
    let read_text = |name: &str| -> Result<Option<String>, ModulesError> {
        let p = base.join(name);
        match tree.get(&p).map(|e| &e.kind) {
            Some(EntryKind::File(d)) => {
                let bytes = d.read().map_err(|err| ModulesError::Read {
                    path: p.display().to_string(),
                    err,
                })?;
                Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
            }
            _ => Ok(None),
        }
    };
    let builtin: BTreeSet<String> = read_text("modules.builtin")?
        .map(|t| t.lines().map(|l| module_name(Path::new(l))).collect())
        .unwrap_or_default();
    let alias_file = read_text("modules.alias")?;
    let mut aliases = parse_aliases(
        alias_file.as_deref().unwrap_or_default(),
        read_text("modules.builtin.modinfo")?
            .unwrap_or_default()
            .as_bytes(),
    );
    let dir_shown = base.display().to_string();
    let modinfo = ModinfoDeps {
        tree,
        base: base.clone(),
    };
    let dep_file = match read_text("modules.dep")? {
        Some(text) => Some(DepFile::parse(&text, &format!("{dir_shown}/modules.dep"))?),
        None => None,
    };
    let src: &dyn DepSource = match &dep_file {
        Some(df) => df,
        None => &modinfo,
    };
    let mut walked = order_with_aliases(wanted, &index, &builtin, &aliases, src, &dir_shown)?;
    if alias_file.is_none() && !walked.missing_soft.is_empty() {
        let found = providers_by_name(&walked.missing_soft, &index, &modinfo)?;
        if !found.is_empty() {
            aliases.extend(found);
            walked = order_with_aliases(wanted, &index, &builtin, &aliases, src, &dir_shown)?;
        }
    }
    let warnings = walked
        .missing_soft
        .iter()
        .map(|(soft, by)| {
            format!(
                "initramfs: module {by} soft-depends on {soft:?}, which is no module, alias or built-in of kernel {kver} under {dir_shown}: left out; if {by} needs it, list the module that provides it in initramfs_modules (ext4's crc32c: crc32c_generic)"
            )
        })
        .collect();
    Ok(Resolved {
        kernel_version: kver,
        order: walked.order,
        deps: walked.after,
        late: Vec::new(),
        warnings,
    })
}

/// `early` resolved, with `late` resolved after it: `late`'s modules and
/// their dependencies that `early` does not already load.
pub fn with_late(
    tree: &Tree,
    modules_dir: &str,
    kernel: &Path,
    early: &[String],
    late: &[String],
) -> Result<Resolved, ModulesError> {
    let mut r = resolve(tree, modules_dir, kernel, early)?;
    if !late.is_empty() {
        let all: Vec<String> = early.iter().chain(late).cloned().collect();
        let full = resolve(tree, modules_dir, kernel, &all)?;
        r.deps = full.deps;
        r.warnings = full.warnings;
        r.late = full
            .order
            .into_iter()
            .filter(|p| !r.order.contains(p))
            .collect();
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use basalt_rootfs::tree::{Entry, FileData};

    const KVER: &str = "6.1.0-56-cloud-amd64";

    fn assets() -> Option<PathBuf> {
        let base = std::env::var_os("BASALT_ASSETS")
            .map(PathBuf::from)
            .unwrap_or_else(|| crate::imagedef::source_dir().join(".cache/assets"));
        let k = base.join("amd64/kernel");
        if k.is_dir() {
            Some(k)
        } else {
            eprintln!(
                "SKIPPED: no kernel assets at {} (run tests/assets/fetch)",
                k.display()
            );
            None
        }
    }

    #[test]
    fn modinfo_of_a_real_module() {
        let Some(k) = assets() else { return };
        let mods = k.join("lib/modules");
        let kver = std::fs::read_dir(&mods)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .file_name();
        let data =
            std::fs::read(mods.join(kver).join("kernel/drivers/virtio/virtio_pci.ko")).unwrap();
        let sec = elf_section(&data, ".modinfo").unwrap().unwrap();
        let info = parse_modinfo(sec);
        assert_eq!(
            info.depends,
            [
                "virtio_ring",
                "virtio_pci_modern_dev",
                "virtio_pci_legacy_dev",
                "virtio"
            ]
        );
        assert!(elf_section(&data, ".nosuchsection").unwrap().is_none());
    }

    #[test]
    fn softdep_pre_only() {
        let info =
            parse_modinfo(b"name=x\0softdep=pre: ecb crc32c post: foo\0softdep=gcm\0depends=\0");
        assert_eq!(info.softdep_pre, ["ecb", "crc32c"]);
        assert!(info.depends.is_empty());
    }

    #[test]
    fn elf32_big_endian_section() {
        // Minimal ELF32 BE: header, a .modinfo section and a name table.
        let mut f = vec![0u8; 0x34];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 1;
        f[5] = 2;
        let names = b"\0.shstrtab\0.modinfo\0";
        let modinfo = b"depends=a,b-c\0";
        let names_off = f.len();
        f.extend_from_slice(names);
        let mi_off = f.len();
        f.extend_from_slice(modinfo);
        let shoff = f.len();
        let sh = |name: u32, off: usize, size: usize| {
            let mut s = vec![0u8; 40];
            s[0..4].copy_from_slice(&name.to_be_bytes());
            s[0x10..0x14].copy_from_slice(&(off as u32).to_be_bytes());
            s[0x14..0x18].copy_from_slice(&(size as u32).to_be_bytes());
            s
        };
        f.extend(sh(0, 0, 0));
        f.extend(sh(1, names_off, names.len()));
        f.extend(sh(11, mi_off, modinfo.len()));
        f[0x20..0x24].copy_from_slice(&(shoff as u32).to_be_bytes());
        f[0x2E..0x30].copy_from_slice(&40u16.to_be_bytes());
        f[0x30..0x32].copy_from_slice(&3u16.to_be_bytes());
        f[0x32..0x34].copy_from_slice(&1u16.to_be_bytes());
        let sec = elf_section(&f, ".modinfo").unwrap().unwrap();
        assert_eq!(parse_modinfo(sec).depends, ["a", "b_c"]);
        assert!(
            elf_section(
                b"not elf at all, long enough to pass the length check....",
                ".x"
            )
            .is_err()
        );
    }

    struct Fake(BTreeMap<&'static str, (Vec<&'static str>, Vec<&'static str>)>);
    impl DepSource for Fake {
        fn deps(&self, rel: &Path) -> Result<ModInfo, ModulesError> {
            let (d, s) = self
                .0
                .get(module_name(rel).as_str())
                .cloned()
                .unwrap_or_default();
            Ok(ModInfo {
                depends: d.into_iter().map(String::from).collect(),
                softdep_pre: s.into_iter().map(String::from).collect(),
                aliases: Vec::new(),
            })
        }
    }

    fn idx(names: &[&str]) -> BTreeMap<String, PathBuf> {
        names
            .iter()
            .map(|n| (n.to_string(), PathBuf::from(format!("kernel/{n}.ko"))))
            .collect()
    }

    #[test]
    fn dependencies_first_softdeps_before_and_optional() {
        let fake = Fake(BTreeMap::from([
            ("vfat", (vec!["fat"], vec![])),
            ("fat", (vec![], vec![])),
            (
                "ext4",
                (
                    vec!["jbd2", "mbcache"],
                    vec!["crc32c_generic", "missing_soft"],
                ),
            ),
            ("jbd2", (vec![], vec![])),
        ]));
        let index = idx(&["vfat", "fat", "ext4", "jbd2", "mbcache", "crc32c_generic"]);
        let (got, after) = order(
            &["vfat".into(), "ext4".into(), "fat".into()],
            &index,
            &BTreeSet::new(),
            &fake,
            "d",
        )
        .unwrap();
        let names: Vec<String> = got.iter().map(|p| module_name(p)).collect();
        assert_eq!(
            names,
            ["fat", "vfat", "crc32c_generic", "jbd2", "mbcache", "ext4"]
        );
        // What each needs first: soft dependencies present, then hard ones;
        // the absent soft dependency is not there.
        let k = |n: &str| PathBuf::from(format!("kernel/{n}.ko"));
        assert_eq!(
            after,
            BTreeMap::from([
                (k("vfat"), vec![k("fat")]),
                (
                    k("ext4"),
                    vec![k("crc32c_generic"), k("jbd2"), k("mbcache")]
                ),
            ])
        );
    }

    /// ext4's `softdep=pre: crc32c`: an alias, met by the module behind it
    /// (modules.alias), by a built-in's alias, or by a module taken anyway;
    /// found nowhere it is left out and said, and a later hard dependency on
    /// the same name still fails.
    #[test]
    fn soft_dependencies_on_aliases() {
        let fake = Fake(BTreeMap::from([
            ("ext4", (vec!["jbd2"], vec!["crc32c"])),
            ("jbd2", (vec![], vec!["crc32c"])),
            ("needs_nope", (vec!["nope"], vec![])),
            ("soft_nope", (vec![], vec!["nope"])),
        ]));
        let index = idx(&["ext4", "jbd2", "crc32c_generic", "needs_nope", "soft_nope"]);
        let aliases = parse_aliases(
            "# Aliases extracted from modules themselves.\nalias crypto-crc32c crc32c_generic\nalias crc32c crc32c_generic\nalias pci:v00008086d* e1000e\n",
            b"",
        );
        assert_eq!(
            aliases,
            BTreeMap::from([
                ("crc32c".to_string(), vec!["crc32c_generic".to_string()]),
                (
                    "crypto_crc32c".to_string(),
                    vec!["crc32c_generic".to_string()]
                ),
            ])
        );
        let w = order_with_aliases(
            &["ext4".into()],
            &index,
            &BTreeSet::new(),
            &aliases,
            &fake,
            "d",
        )
        .unwrap();
        let names: Vec<String> = w.order.iter().map(|p| module_name(p)).collect();
        assert_eq!(names, ["crc32c_generic", "jbd2", "ext4"]);
        let k = |n: &str| PathBuf::from(format!("kernel/{n}.ko"));
        assert_eq!(w.after[&k("ext4")], [k("crc32c_generic"), k("jbd2")]);
        assert!(w.missing_soft.is_empty());

        // No alias file: a built-in's alias (modules.builtin.modinfo) meets it.
        let builtin_aliases = parse_aliases(
            "",
            b"crc32c_generic.alias=crypto-crc32c\0crc32c_generic.alias=crc32c\0ext4.alias=fs-ext4\0",
        );
        let builtin = BTreeSet::from(["crc32c_generic".to_string()]);
        let index = idx(&["ext4", "jbd2"]);
        let w = order_with_aliases(
            &["ext4".into()],
            &index,
            &builtin,
            &builtin_aliases,
            &fake,
            "d",
        )
        .unwrap();
        assert!(w.missing_soft.is_empty(), "{:?}", w.missing_soft);
        assert_eq!(w.order.len(), 2);

        // Found nowhere: left out, said once per module that wants it.
        let nothing = BTreeMap::new();
        let w = order_with_aliases(
            &["ext4".into()],
            &index,
            &BTreeSet::new(),
            &nothing,
            &fake,
            "d",
        )
        .unwrap();
        assert_eq!(
            w.missing_soft,
            BTreeSet::from([
                ("crc32c".to_string(), "ext4".to_string()),
                ("crc32c".to_string(), "jbd2".to_string()),
            ])
        );
        let index = idx(&["soft_nope", "needs_nope"]);
        let e = order_with_aliases(
            &["soft_nope".into(), "needs_nope".into()],
            &index,
            &BTreeSet::new(),
            &nothing,
            &fake,
            "d",
        )
        .unwrap_err();
        assert!(matches!(e, ModulesError::NotFound { .. }), "{e}");
    }

    /// A module taken anyway (here: listed by the board) whose own `alias=`
    /// is the soft dependency meets it: no warning.
    #[test]
    fn a_taken_modules_alias_meets_a_soft_dependency() {
        struct WithAlias;
        impl DepSource for WithAlias {
            fn deps(&self, rel: &Path) -> Result<ModInfo, ModulesError> {
                Ok(match module_name(rel).as_str() {
                    "ext4" => ModInfo {
                        softdep_pre: vec!["crypto_crc32c".into()],
                        ..ModInfo::default()
                    },
                    "crc32c_generic" => {
                        parse_modinfo(b"alias=crypto-crc32c\0alias=crc32c\0license=GPL\0")
                    }
                    _ => ModInfo::default(),
                })
            }
        }
        let index = idx(&["ext4", "crc32c_generic"]);
        let w = order_with_aliases(
            &["ext4".into(), "crc32c_generic".into()],
            &index,
            &BTreeSet::new(),
            &BTreeMap::new(),
            &WithAlias,
            "d",
        )
        .unwrap();
        assert_eq!(w.order.len(), 2);
        assert!(w.missing_soft.is_empty(), "{:?}", w.missing_soft);
    }

    /// No modules.alias (Debian's packages): crc_t10dif's `pre: crct10dif`
    /// is met by the modules named `crct10dif_...` whose own `alias=` it is
    /// (both, as modprobe loads every match), not by `crct10dif_common`,
    /// which shares the prefix only; one with no such module stays missing.
    #[test]
    fn soft_dependency_providers_found_by_name_without_an_alias_file() {
        struct Crc;
        impl DepSource for Crc {
            fn deps(&self, rel: &Path) -> Result<ModInfo, ModulesError> {
                Ok(match module_name(rel).as_str() {
                    "crc_t10dif" => parse_modinfo(
                        b"softdep=pre: crct10dif\0softdep=pre: nothing_here\0depends=crct10dif_common\0",
                    ),
                    "crct10dif_generic" => parse_modinfo(
                        b"alias=crypto-crct10dif\0alias=crct10dif\0depends=crct10dif_common\0",
                    ),
                    "crct10dif_pclmul" => parse_modinfo(
                        b"alias=crct10dif-pclmul\0alias=crct10dif\0depends=crct10dif_common\0",
                    ),
                    "crct10dif_common" => parse_modinfo(b"alias=crct10dif-common\0"),
                    _ => ModInfo::default(),
                })
            }
        }
        let index = idx(&[
            "crc_t10dif",
            "crct10dif_common",
            "crct10dif_generic",
            "crct10dif_pclmul",
            "nothing",
        ]);
        let first = order_with_aliases(
            &["crc_t10dif".into()],
            &index,
            &BTreeSet::new(),
            &BTreeMap::new(),
            &Crc,
            "d",
        )
        .unwrap();
        let found = providers_by_name(&first.missing_soft, &index, &Crc).unwrap();
        assert_eq!(
            found,
            BTreeMap::from([(
                "crct10dif".to_string(),
                vec![
                    "crct10dif_generic".to_string(),
                    "crct10dif_pclmul".to_string()
                ]
            )])
        );
        let w = order_with_aliases(
            &["crc_t10dif".into()],
            &index,
            &BTreeSet::new(),
            &found,
            &Crc,
            "d",
        )
        .unwrap();
        let names: Vec<String> = w.order.iter().map(|p| module_name(p)).collect();
        assert_eq!(
            names,
            [
                "crct10dif_common",
                "crct10dif_generic",
                "crct10dif_pclmul",
                "crc_t10dif"
            ]
        );
        let k = |n: &str| PathBuf::from(format!("kernel/{n}.ko"));
        assert_eq!(
            w.after[&k("crc_t10dif")],
            [
                k("crct10dif_generic"),
                k("crct10dif_pclmul"),
                k("crct10dif_common")
            ]
        );
        assert_eq!(
            w.missing_soft,
            BTreeSet::from([("nothing_here".to_string(), "crc_t10dif".to_string())])
        );
    }

    #[test]
    fn missing_cycle_and_builtin() {
        let fake = Fake(BTreeMap::from([
            ("a", (vec!["b"], vec![])),
            ("b", (vec!["a"], vec![])),
            ("c", (vec!["nope"], vec![])),
            ("d", (vec!["ext4"], vec![])),
        ]));
        let index = idx(&["a", "b", "c", "d"]);
        let e = order(&["a".into()], &index, &BTreeSet::new(), &fake, "d").unwrap_err();
        assert!(matches!(e, ModulesError::Cycle { .. }), "{e}");
        let e = order(&["c".into()], &index, &BTreeSet::new(), &fake, "d").unwrap_err();
        assert!(
            e.to_string().contains("\"nope\"") && e.to_string().contains("c"),
            "{e}"
        );
        let builtin = BTreeSet::from(["ext4".to_string()]);
        let (got, after) =
            order(&["d".into(), "ext4".into()], &index, &builtin, &fake, "d").unwrap();
        assert_eq!(got, [PathBuf::from("kernel/d.ko")]);
        assert!(after.is_empty(), "a built-in dependency is not waited for");
    }

    #[test]
    fn modules_dep_file_is_used_when_present() {
        let mut t = Tree::new();
        let base = format!("lib/modules/{KVER}");
        for m in ["kernel/fs/fat/fat.ko", "kernel/fs/fat/vfat.ko"] {
            // Not ELF: proves modules.dep is read instead of .modinfo.
            t.insert(
                format!("{base}/{m}"),
                Entry::file(FileData::Bytes(Default::default()), 0o644),
            )
            .unwrap();
        }
        t.insert(
            format!("{base}/modules.dep"),
            Entry::file(
                FileData::Bytes(std::sync::Arc::new(
                    b"kernel/fs/fat/vfat.ko: kernel/fs/fat/fat.ko\nkernel/fs/fat/fat.ko:\n"
                        .to_vec(),
                )),
                0o644,
            ),
        )
        .unwrap();
        let r = resolve(
            &t,
            "lib/modules",
            Path::new("boot/vmlinuz-x"),
            &["vfat".into()],
        )
        .unwrap();
        assert_eq!(r.kernel_version, KVER);
        assert_eq!(
            r.order,
            [
                PathBuf::from("kernel/fs/fat/fat.ko"),
                PathBuf::from("kernel/fs/fat/vfat.ko")
            ]
        );
    }

    #[test]
    fn board_modules_resolve_on_real_kernel() {
        let Some(k) = assets() else { return };
        let spec = basalt_rootfs::overlay::OverlaySpec {
            source: k,
            exclude: vec!["usr".into()],
            ..Default::default()
        };
        let tree = basalt_rootfs::overlay::load(&spec).unwrap();
        let board = crate::board::Board::embedded("x86_64").unwrap();
        let r = with_late(
            &tree,
            "lib/modules",
            Path::new("boot/vmlinuz-6"),
            &board.initramfs.modules,
            &board.initramfs.late_modules,
        )
        .unwrap();
        let names: Vec<String> = r.order.iter().map(|p| module_name(p)).collect();
        let pos = |n: &str| names.iter().position(|x| x == n).unwrap();
        assert!(pos("virtio_ring") < pos("virtio_blk"));
        assert!(pos("virtio") < pos("virtio_pci"));
        assert!(pos("virtio_pci_modern_dev") < pos("virtio_pci"));
        assert!(pos("fat") < pos("vfat"));
        // dm-verity needs dm-bufio and dm-mod first.
        assert!(pos("dm_mod") < pos("dm_verity") && pos("dm_bufio") < pos("dm_verity"));
        assert_eq!(names.len(), 16, "{names:?}");
        // The late ones: softdog pulls in watchdog, which the early set lacks.
        let late: Vec<String> = r.late.iter().map(|p| module_name(p)).collect();
        assert_eq!(late, ["watchdog", "softdog"], "{late:?}");
        // What each needs first (stage 1 loads the rest concurrently): from
        // the modules' own `.modinfo`, always listed before them.
        let needs = |n: &str| -> Vec<String> {
            let m = r.order.iter().chain(&r.late).find(|p| module_name(p) == n);
            let mut d: Vec<String> = r
                .deps
                .get(m.unwrap())
                .into_iter()
                .flatten()
                .map(|p| module_name(p))
                .collect();
            d.sort();
            d
        };
        assert_eq!(needs("virtio_blk"), ["virtio", "virtio_ring"]);
        assert_eq!(needs("vfat"), ["fat"]);
        assert!(needs("squashfs").is_empty() && needs("virtio_ring").is_empty());
        assert!(needs("dm_verity").contains(&"dm_bufio".to_string()));
        assert_eq!(needs("softdog"), ["watchdog"]);
        let all: Vec<&PathBuf> = r.order.iter().chain(&r.late).collect();
        for (m, deps) in &r.deps {
            let at = all.iter().position(|p| *p == m).unwrap();
            for d in deps {
                assert!(
                    all.iter().position(|p| *p == d).unwrap() < at,
                    "{m:?} before {d:?}"
                );
            }
        }
    }

    #[test]
    fn late_modules_get_only_the_dependencies_not_loaded_early() {
        let mut t = Tree::new();
        let base = format!("lib/modules/{KVER}");
        for m in ["kernel/a.ko", "kernel/b.ko", "kernel/c.ko", "kernel/d.ko"] {
            t.insert(
                format!("{base}/{m}"),
                Entry::file(FileData::Bytes(Default::default()), 0o644),
            )
            .unwrap();
        }
        // d needs c and a; c needs a; b needs a.
        let dep = b"kernel/a.ko:\nkernel/b.ko: kernel/a.ko\nkernel/c.ko: kernel/a.ko\nkernel/d.ko: kernel/c.ko kernel/a.ko\n";
        t.insert(
            format!("{base}/modules.dep"),
            Entry::file(FileData::Bytes(std::sync::Arc::new(dep.to_vec())), 0o644),
        )
        .unwrap();
        let kernel = Path::new("boot/vmlinuz-x");
        let r = with_late(&t, "lib/modules", kernel, &["b".into()], &["d".into()]).unwrap();
        assert_eq!(
            r.order,
            [PathBuf::from("kernel/a.ko"), "kernel/b.ko".into()]
        );
        assert_eq!(r.late, [PathBuf::from("kernel/c.ko"), "kernel/d.ko".into()]);
        // No late modules: nothing more.
        let r = with_late(&t, "lib/modules", kernel, &["b".into()], &[]).unwrap();
        assert!(r.late.is_empty());
        // A late module the early set already has: not loaded twice.
        let r = with_late(
            &t,
            "lib/modules",
            kernel,
            &["d".into()],
            &["b".into(), "c".into()],
        )
        .unwrap();
        assert_eq!(r.late, [PathBuf::from("kernel/b.ko")]);
    }

    /// Alpine ships `.ko.gz`; other distributions `.ko.xz` or `.ko.zst`. The
    /// real kernel's modules, each compressed one of the three ways, resolve
    /// in the same order, and the initramfs gets them decompressed as `.ko`.
    #[test]
    fn compressed_modules_resolve_and_land_decompressed() {
        use std::io::Write;
        let Some(k) = assets() else { return };
        let spec = basalt_rootfs::overlay::OverlaySpec {
            source: k,
            exclude: vec!["usr".into()],
            ..Default::default()
        };
        let plain = basalt_rootfs::overlay::load(&spec).unwrap();
        let board = crate::board::Board::embedded("x86_64").unwrap();
        let wanted = &board.initramfs.modules;
        let kernel = Path::new("boot/vmlinuz-6");
        let want = resolve(&plain, "lib/modules", kernel, wanted).unwrap();

        let mut tree = Tree::new();
        let mut originals = BTreeMap::new();
        for (i, (p, e)) in plain.iter().enumerate() {
            let is_ko = p.extension().is_some_and(|x| x == "ko");
            match (&e.kind, is_ko) {
                (EntryKind::File(d), true) => {
                    let raw = d.read().unwrap();
                    let (suffix, packed) = match i % 3 {
                        0 => {
                            let mut z = flate2::write::GzEncoder::new(
                                Vec::new(),
                                flate2::Compression::fast(),
                            );
                            z.write_all(&raw).unwrap();
                            ("gz", z.finish().unwrap())
                        }
                        1 => {
                            let mut z = liblzma::write::XzEncoder::new(Vec::new(), 0);
                            z.write_all(&raw).unwrap();
                            ("xz", z.finish().unwrap())
                        }
                        _ => ("zst", zstd::stream::encode_all(&raw[..], 1).unwrap()),
                    };
                    let name = format!("{}.{suffix}", p.display());
                    originals.insert(PathBuf::from(&name), raw);
                    let entry = Entry::file(FileData::Bytes(std::sync::Arc::new(packed)), 0o644);
                    tree.insert(&name, entry).unwrap();
                }
                _ => tree.insert(p, e.clone()).unwrap(),
            }
        }
        let got = resolve(&tree, "lib/modules", kernel, wanted).unwrap();
        let names =
            |r: &Resolved| -> Vec<String> { r.order.iter().map(|p| module_name(p)).collect() };
        assert_eq!(names(&got), names(&want));
        let base = Path::new("lib/modules").join(&got.kernel_version);
        for (rel, plain_rel) in got.order.iter().zip(&want.order) {
            assert_ne!(rel, plain_rel, "{rel:?} should be the compressed file");
            assert_eq!(&initramfs_path(rel), plain_rel);
            let Some(EntryKind::File(d)) = tree.get(base.join(rel)).map(|e| &e.kind) else {
                panic!("{rel:?} missing");
            };
            let out = decompress(rel, d.read().unwrap()).unwrap();
            assert_eq!(&out, &originals[&base.join(rel)], "{rel:?}");
        }
        // A damaged archive is an error naming the module, not garbage in the initramfs.
        let bad = decompress(Path::new("kernel/x.ko.gz"), b"not gzip".to_vec()).unwrap_err();
        assert!(bad.to_string().contains("kernel/x.ko.gz"), "{bad}");
    }
}
