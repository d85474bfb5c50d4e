//! The dependency resolver: from the image definition's package list (the "world")
//! to a closed set of packages (REFERENCE.md §5.4).
//!
//! Rules, as apk applies them:
//! * one package per name; a versioned provide (`so:libc.musl-x86_64.so.1=1`,
//!   `cmd:sh=…`) makes its package the exclusive owner of that name;
//! * a dependency is satisfied by the package of that name, then by versioned
//!   providers (highest `provider_priority`, then highest provided version), then by
//!   unversioned ("virtual") providers, which are only auto-selected when they have
//!   a `provider_priority` or are the only provider;
//! * among packages of one name the highest version wins, then the earlier repository;
//! * packages of a repository tagged `@tag` are only eligible for dependencies
//!   pinned with that tag, and for the dependencies of packages taken from it;
//! * `!dep` forbids matching packages; `install_if` adds a package once everything
//!   it lists is installed.
//!
//! The search is depth-first with backtracking over the alternatives of each choice,
//! bounded by a step budget. A failure names the chain of needs that led to it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::rc::Rc;

use super::dep::Dependency;
use super::index::{Index, PackageInfo};

/// Most choices a resolution may try before giving up.
const STEP_BUDGET: usize = 50_000;

/// One package of the resolved set.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Position of the repository in the list passed to [`resolve`].
    pub repo: usize,
    pub package: PackageInfo,
}

/// The resolved, closed set, sorted by package name.
#[derive(Debug, Clone)]
pub struct Resolution {
    pub packages: Vec<Candidate>,
}

impl Resolution {
    /// `name-version` lines, sorted: what `basalt packages resolve` prints.
    pub fn ids(&self) -> Vec<String> {
        self.packages.iter().map(|c| c.package.id()).collect()
    }

    pub fn get(&self, name: &str) -> Option<&Candidate> {
        self.packages.iter().find(|c| c.package.name == name)
    }

    /// Positions in `packages`, dependencies before the packages that need them
    /// (apk's install order; ties and cycles broken by name), so a package's
    /// files land on the directories and links its dependencies provide.
    pub fn install_order(&self) -> Vec<usize> {
        let satisfies = |c: &Candidate, d: &Dependency| {
            let csum = c.package.checksum.as_ref().map(ToString::to_string);
            (c.package.name == d.name
                && d.version_matches(Some(&c.package.version), csum.as_deref()))
                || c.package
                    .provides
                    .iter()
                    .any(|p| p.name == d.name && d.version_matches(p.version.as_deref(), None))
        };
        let mut order = Vec::with_capacity(self.packages.len());
        let mut state = vec![0u8; self.packages.len()]; // 0 new, 1 visiting, 2 done
        fn visit(
            i: usize,
            pkgs: &[Candidate],
            state: &mut [u8],
            order: &mut Vec<usize>,
            satisfies: &dyn Fn(&Candidate, &Dependency) -> bool,
        ) {
            if state[i] != 0 {
                return;
            }
            state[i] = 1;
            for d in pkgs[i].package.depends.iter().filter(|d| !d.conflict) {
                if let Some(j) = pkgs.iter().position(|c| satisfies(c, d)) {
                    visit(j, pkgs, state, order, satisfies);
                }
            }
            state[i] = 2;
            order.push(i);
        }
        for i in 0..self.packages.len() {
            visit(i, &self.packages, &mut state, &mut order, &satisfies);
        }
        order
    }
}

/// The chain of "X needs Y" that led to a failure; the first link is the world.
#[derive(Debug, Clone, Default)]
pub struct Chain(pub Vec<(String, String)>);

impl fmt::Display for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (who, what)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{who} needs {what}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ResolveError {
    #[error("{chain} which no repository provides")]
    NotProvided { chain: Chain },
    #[error("{chain}, but {reason}")]
    Conflict { chain: Chain, reason: String },
    #[error(
        "{chain}, a virtual name with several providers and no priority: pick one of {providers:?}"
    )]
    Ambiguous {
        chain: Chain,
        providers: Vec<String>,
    },
    #[error("resolution gave up after {0} choices (conflicting constraints?)")]
    TooComplex(usize),
}

/// A repository's index as the resolver sees it.
#[derive(Debug, Clone, Copy)]
pub struct RepoRef<'a> {
    /// `@tag` of the repository, if pinned.
    pub tag: Option<&'a str>,
    pub index: &'a Index,
}

struct Pkg<'a> {
    repo: usize,
    tag: Option<&'a str>,
    info: &'a PackageInfo,
    checksum: Option<String>,
}

/// Where a name can come from.
#[derive(Clone, Copy)]
struct Offer<'a> {
    pkg: usize,
    /// `None` = unversioned (virtual) provide.
    version: Option<&'a str>,
    real: bool,
}

struct Universe<'a> {
    pkgs: Vec<Pkg<'a>>,
    /// Lockfile pins: package name → the only identity checksum allowed.
    pins: &'a BTreeMap<String, String>,
    by_name: HashMap<&'a str, Vec<Offer<'a>>>,
    install_if: Vec<usize>,
}

#[derive(Clone)]
struct Pending {
    dep: Dependency,
    chain: Rc<Vec<(String, String)>>,
    /// Repository tags inherited from the package that needs this.
    tags: Rc<Vec<String>>,
}

#[derive(Clone, Default)]
struct State {
    chosen: Vec<usize>,
    by_pkgname: HashMap<String, usize>,
    /// Names owned exclusively (package names and versioned provides) → package.
    exclusive: HashMap<String, usize>,
    /// `!dep` constraints and who declared them (`None` = the world).
    conflicts: Vec<(Dependency, Option<usize>)>,
    /// `install_if` packages that triggered but could not be installed (apk skips them).
    skipped: HashSet<String>,
    pending: Vec<Pending>,
    /// Index into `pending` of the next one to process (FIFO, keeps world order).
    next: usize,
}

impl<'a> Universe<'a> {
    fn new(repos: &[RepoRef<'a>], pins: &'a BTreeMap<String, String>) -> Universe<'a> {
        let mut pkgs = Vec::new();
        for (ri, r) in repos.iter().enumerate() {
            for info in &r.index.packages {
                pkgs.push(Pkg {
                    repo: ri,
                    tag: r.tag,
                    info,
                    checksum: info.checksum.as_ref().map(ToString::to_string),
                });
            }
        }
        let mut by_name: HashMap<&str, Vec<Offer>> = HashMap::new();
        let mut install_if = Vec::new();
        for (i, p) in pkgs.iter().enumerate() {
            by_name.entry(&p.info.name).or_default().push(Offer {
                pkg: i,
                version: Some(&p.info.version),
                real: true,
            });
            for pr in &p.info.provides {
                by_name.entry(&pr.name).or_default().push(Offer {
                    pkg: i,
                    version: pr.version.as_deref(),
                    real: false,
                });
            }
            if !p.info.install_if.is_empty() {
                install_if.push(i);
            }
        }
        Universe {
            pkgs,
            pins,
            by_name,
            install_if,
        }
    }

    fn id(&self, p: usize) -> String {
        self.pkgs[p].info.id()
    }

    /// Does package `p` satisfy `dep` (ignoring `dep.conflict` and tags)?
    fn matches(&self, p: usize, dep: &Dependency) -> bool {
        let pk = &self.pkgs[p];
        let info = pk.info;
        (info.name == dep.name && dep.version_matches(Some(&info.version), pk.checksum.as_deref()))
            || info
                .provides
                .iter()
                .any(|pr| pr.name == dep.name && dep.version_matches(pr.version.as_deref(), None))
    }

    fn eligible(&self, p: usize, dep_tag: Option<&str>, inherited: &[String]) -> bool {
        if let Some(pin) = self.pins.get(&self.pkgs[p].info.name)
            && self.pkgs[p].checksum.as_deref() != Some(pin.as_str())
        {
            return false;
        }
        match self.pkgs[p].tag {
            None => true,
            Some(t) => dep_tag == Some(t) || inherited.iter().any(|i| i == t),
        }
    }

    /// Candidates for `dep`, best first. `Err` carries the unprioritised virtual
    /// providers when the choice among them is ambiguous.
    fn candidates(
        &self,
        dep: &Dependency,
        inherited: &[String],
    ) -> Result<Vec<usize>, Vec<String>> {
        let Some(offers) = self.by_name.get(dep.name.as_str()) else {
            return Ok(Vec::new());
        };
        let mut real = Vec::new();
        let mut versioned = Vec::new();
        let mut virt_prio = Vec::new();
        let mut virt_plain = Vec::new();
        for o in offers {
            if !self.eligible(o.pkg, dep.tag.as_deref(), inherited) {
                continue;
            }
            let pk = &self.pkgs[o.pkg];
            if !dep.version_matches(o.version, pk.checksum.as_deref()) {
                continue;
            }
            match (o.real, o.version) {
                (true, _) => real.push(*o),
                (false, Some(_)) => versioned.push(*o),
                (false, None) if pk.info.provider_priority.is_some() => virt_prio.push(*o),
                (false, None) => virt_plain.push(*o),
            }
        }
        let ver_desc = |a: &Offer, b: &Offer| {
            super::version::compare(b.version.unwrap_or("0"), a.version.unwrap_or("0"))
        };
        let prio = |o: &Offer| self.pkgs[o.pkg].info.provider_priority.unwrap_or(0);
        real.sort_by(|a, b| ver_desc(a, b).then(self.pkgs[a.pkg].repo.cmp(&self.pkgs[b.pkg].repo)));
        versioned.sort_by(|a, b| {
            prio(b)
                .cmp(&prio(a))
                .then(ver_desc(a, b))
                .then(self.pkgs[a.pkg].repo.cmp(&self.pkgs[b.pkg].repo))
                .then(self.pkgs[a.pkg].info.name.cmp(&self.pkgs[b.pkg].info.name))
        });
        virt_prio.sort_by(|a, b| {
            prio(b)
                .cmp(&prio(a))
                .then(self.pkgs[a.pkg].repo.cmp(&self.pkgs[b.pkg].repo))
                .then(self.pkgs[a.pkg].info.name.cmp(&self.pkgs[b.pkg].info.name))
        });
        let mut out: Vec<usize> = real
            .iter()
            .chain(&versioned)
            .chain(&virt_prio)
            .map(|o| o.pkg)
            .collect();
        let plain_names: HashSet<&str> = virt_plain
            .iter()
            .map(|o| self.pkgs[o.pkg].info.name.as_str())
            .collect();
        if out.is_empty() && plain_names.len() > 1 {
            let mut v: Vec<String> = plain_names.into_iter().map(String::from).collect();
            v.sort();
            return Err(v);
        }
        out.extend(virt_plain.iter().map(|o| o.pkg));
        let mut seen = HashSet::new();
        out.retain(|p| seen.insert(*p));
        Ok(out)
    }

    /// Why `p` cannot join `st`, if it cannot.
    fn clash(&self, st: &State, p: usize) -> Option<String> {
        let info = self.pkgs[p].info;
        if let Some(&q) = st.by_pkgname.get(&info.name) {
            return Some(format!("{} is already chosen", self.id(q)));
        }
        let mut owned = vec![info.name.as_str()];
        owned.extend(
            info.provides
                .iter()
                .filter(|pr| pr.version.is_some())
                .map(|pr| pr.name.as_str()),
        );
        for n in owned {
            if let Some(&q) = st.exclusive.get(n) {
                return Some(format!(
                    "{} and {} both provide {n}",
                    self.id(p),
                    self.id(q)
                ));
            }
        }
        for (c, owner) in &st.conflicts {
            if self.matches(p, c) {
                let who = owner.map_or_else(|| "the world".to_string(), |o| self.id(o));
                return Some(format!("{who} forbids {c}, which {} matches", self.id(p)));
            }
        }
        for c in info.depends.iter().filter(|d| d.conflict) {
            for &q in &st.chosen {
                if self.matches(q, c) {
                    return Some(format!("{} conflicts with {}", self.id(p), self.id(q)));
                }
            }
        }
        None
    }

    fn add(&self, st: &mut State, p: usize, chain: &Rc<Vec<(String, String)>>) {
        let pk = &self.pkgs[p];
        let info = pk.info;
        st.chosen.push(p);
        st.by_pkgname.insert(info.name.clone(), p);
        st.exclusive.insert(info.name.clone(), p);
        for pr in info.provides.iter().filter(|pr| pr.version.is_some()) {
            st.exclusive.insert(pr.name.clone(), p);
        }
        let mut tags: Vec<String> = Vec::new();
        if let Some(t) = pk.tag {
            tags.push(t.to_string());
        }
        let tags = Rc::new(tags);
        for d in &info.depends {
            if d.conflict {
                st.conflicts.push((d.clone(), Some(p)));
                continue;
            }
            let mut c = (**chain).clone();
            c.push((info.id(), d.to_string()));
            st.pending.push(Pending {
                dep: d.clone(),
                chain: Rc::new(c),
                tags: tags.clone(),
            });
        }
    }

    fn satisfied(&self, st: &State, dep: &Dependency) -> bool {
        st.chosen.iter().any(|&q| self.matches(q, dep))
    }

    /// Packages whose `install_if` now holds and that are not yet installed.
    fn triggered(&self, st: &State) -> Option<usize> {
        let mut best: BTreeMap<&str, usize> = BTreeMap::new();
        for &p in &self.install_if {
            let info = self.pkgs[p].info;
            if st.by_pkgname.contains_key(&info.name)
                || st.skipped.contains(&info.name)
                || self.pkgs[p].tag.is_some()
            {
                continue;
            }
            let holds = info.install_if.iter().all(|d| {
                if d.conflict {
                    !self.satisfied(st, d)
                } else {
                    self.satisfied(st, d)
                }
            });
            if !holds {
                continue;
            }
            let e = best.entry(&info.name).or_insert(p);
            if super::version::compare(&info.version, &self.pkgs[*e].info.version).is_gt() {
                *e = p;
            }
        }
        best.into_values().next()
    }

    fn solve(&self, mut st: State, steps: &mut usize) -> Result<State, ResolveError> {
        loop {
            *steps += 1;
            if *steps > STEP_BUDGET {
                return Err(ResolveError::TooComplex(STEP_BUDGET));
            }
            if st.next >= st.pending.len() {
                let Some(p) = self.triggered(&st) else {
                    return Ok(st);
                };
                let chain = Rc::new(vec![("install_if".to_string(), self.pkgs[p].info.id())]);
                // apk skips an install_if package that cannot be installed.
                if self.clash(&st, p).is_none() {
                    let mut branch = st.clone();
                    self.add(&mut branch, p, &chain);
                    match self.solve(branch, steps) {
                        Ok(done) => return Ok(done),
                        Err(e @ ResolveError::TooComplex(_)) => return Err(e),
                        Err(_) => {}
                    }
                }
                st.skipped.insert(self.pkgs[p].info.name.clone());
                continue;
            }
            let pend = st.pending[st.next].clone();
            st.next += 1;
            let dep = &pend.dep;
            if self.satisfied(&st, dep) {
                continue;
            }
            let chain = Chain(pend.chain.to_vec());
            let cands =
                self.candidates(dep, &pend.tags)
                    .map_err(|providers| ResolveError::Ambiguous {
                        chain: chain.clone(),
                        providers,
                    })?;
            if cands.is_empty() {
                return Err(ResolveError::NotProvided { chain });
            }
            let mut viable = Vec::new();
            let mut first_clash = None;
            for c in cands {
                match self.clash(&st, c) {
                    None => viable.push(c),
                    Some(r) => {
                        first_clash.get_or_insert(r);
                    }
                }
            }
            match viable.len() {
                0 => {
                    return Err(ResolveError::Conflict {
                        chain,
                        reason: first_clash.unwrap_or_default(),
                    });
                }
                1 => self.add(&mut st, viable[0], &pend.chain),
                _ => {
                    let mut first_err = None;
                    for c in viable {
                        let mut branch = st.clone();
                        self.add(&mut branch, c, &pend.chain);
                        match self.solve(branch, steps) {
                            Ok(done) => return Ok(done),
                            Err(e @ ResolveError::TooComplex(_)) => return Err(e),
                            Err(e) => {
                                first_err.get_or_insert(e);
                            }
                        }
                    }
                    return Err(first_err.unwrap_or(ResolveError::TooComplex(STEP_BUDGET)));
                }
            }
        }
    }
}

/// Resolve `world` against `repos` (earlier repositories win ties).
pub fn resolve(repos: &[RepoRef<'_>], world: &[Dependency]) -> Result<Resolution, ResolveError> {
    resolve_pinned(repos, world, &BTreeMap::new())
}

/// Resolve with a lockfile: a package named in `pins` may only be the one with
/// that identity checksum (`Q1…`). A pin that no repository still serves makes
/// its package unavailable, so the error names what needed it.
pub fn resolve_pinned(
    repos: &[RepoRef<'_>],
    world: &[Dependency],
    pins: &BTreeMap<String, String>,
) -> Result<Resolution, ResolveError> {
    let u = Universe::new(repos, pins);
    let mut st = State::default();
    for d in world {
        if d.conflict {
            st.conflicts.push((d.clone(), None));
            continue;
        }
        st.pending.push(Pending {
            dep: d.clone(),
            chain: Rc::new(vec![("world".to_string(), d.to_string())]),
            tags: Rc::new(Vec::new()),
        });
    }
    let mut steps = 0;
    let st = u.solve(st, &mut steps)?;
    let mut packages: Vec<Candidate> = st
        .chosen
        .iter()
        .map(|&p| Candidate {
            repo: u.pkgs[p].repo,
            package: u.pkgs[p].info.clone(),
        })
        .collect();
    packages.sort_by(|a, b| a.package.name.cmp(&b.package.name));
    Ok(Resolution { packages })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apk::dep::Provide;
    use crate::apk::index::Trust;
    use crate::apk::keys::KeyRing;
    use crate::apk::version;

    fn pkg(name: &str, ver: &str, deps: &str, provides: &str) -> PackageInfo {
        PackageInfo {
            name: name.into(),
            version: ver.into(),
            arch: "x86_64".into(),
            depends: Dependency::parse_list(deps).unwrap(),
            provides: Provide::parse_list(provides).unwrap(),
            ..Default::default()
        }
    }

    fn idx(pkgs: Vec<PackageInfo>) -> Index {
        Index {
            packages: pkgs,
            ..Default::default()
        }
    }

    fn world(s: &str) -> Vec<Dependency> {
        Dependency::parse_list(s).unwrap()
    }

    fn run(repos: &[RepoRef<'_>], w: &str) -> Result<Vec<String>, ResolveError> {
        resolve(repos, &world(w)).map(|r| r.ids())
    }

    /// Independent of the resolver: every dependency of every chosen package is
    /// satisfied by a chosen package, no `!` dependency matches a chosen package,
    /// no two chosen packages share a name or a versioned provide, the world holds.
    fn assert_closed(set: &[Candidate], w: &[Dependency], all: &Index) {
        let pkgs: Vec<&PackageInfo> = set.iter().map(|c| &c.package).collect();
        let sat = |d: &Dependency| {
            pkgs.iter().any(|p| {
                let csum = p.checksum.as_ref().map(ToString::to_string);
                (p.name == d.name && d.version_matches(Some(&p.version), csum.as_deref()))
                    || p.provides.iter().any(|pr| {
                        pr.name == d.name && d.version_matches(pr.version.as_deref(), None)
                    })
            })
        };
        for d in w {
            assert_eq!(sat(d), !d.conflict, "world {d}");
        }
        let mut owners: HashMap<&str, &str> = HashMap::new();
        for p in &pkgs {
            for d in &p.depends {
                if d.conflict {
                    assert!(
                        !sat(d),
                        "{} conflicts with an installed package via {d}",
                        p.id()
                    );
                } else {
                    assert!(sat(d), "{} needs {d}: unsatisfied", p.id());
                }
            }
            let mut names = vec![p.name.as_str()];
            names.extend(
                p.provides
                    .iter()
                    .filter(|x| x.version.is_some())
                    .map(|x| x.name.as_str()),
            );
            for n in names {
                if let Some(o) = owners.insert(n, &p.name) {
                    panic!("{n} owned by both {o} and {}", p.name);
                }
            }
        }
        // Every package whose install_if holds is installed (at its newest version).
        for p in &all.packages {
            if p.install_if.is_empty() || !p.install_if.iter().all(|d| sat(d) != d.conflict) {
                continue;
            }
            let newest = all
                .packages
                .iter()
                .filter(|q| q.name == p.name)
                .all(|q| version::compare(&q.version, &p.version).is_le());
            if newest {
                assert!(
                    pkgs.iter().any(|q| q.name == p.name),
                    "install_if of {} holds",
                    p.id()
                );
            }
        }
    }

    #[test]
    fn highest_version_and_repository_order() {
        let a = idx(vec![pkg("a", "1.0-r0", "", ""), pkg("a", "1.2-r0", "", "")]);
        let b = idx(vec![pkg("a", "1.10-r0", "", "")]);
        let repos = [
            RepoRef {
                tag: None,
                index: &a,
            },
            RepoRef {
                tag: None,
                index: &b,
            },
        ];
        assert_eq!(run(&repos, "a").unwrap(), ["a-1.10-r0"]);
        assert_eq!(run(&repos, "a<1.5").unwrap(), ["a-1.2-r0"]);
        assert_eq!(run(&repos, "a~1.0").unwrap(), ["a-1.0-r0"]);
    }

    #[test]
    fn tag_pinning() {
        let main = idx(vec![pkg("k", "1.0-r0", "", "")]);
        let edge = idx(vec![
            pkg("k", "2.0-r0", "only-edge", ""),
            pkg("only-edge", "1", "", ""),
        ]);
        let repos = [
            RepoRef {
                tag: None,
                index: &main,
            },
            RepoRef {
                tag: Some("edge"),
                index: &edge,
            },
        ];
        assert_eq!(run(&repos, "k").unwrap(), ["k-1.0-r0"]);
        // Pinned: the edge package, and its dependency from edge too.
        assert_eq!(run(&repos, "k@edge").unwrap(), ["k-2.0-r0", "only-edge-1"]);
        assert!(matches!(
            run(&repos, "only-edge"),
            Err(ResolveError::NotProvided { .. })
        ));
    }

    #[test]
    fn provides_so_cmd_pc_and_virtual_priority() {
        let i = idx(vec![
            pkg("musl", "1.2.3-r0", "", "so:libc.musl-x86_64.so.1=1"),
            pkg(
                "app",
                "1",
                "so:libc.musl-x86_64.so.1 cmd:sh pc:zlib>=1.2",
                "",
            ),
            pkg("busybox-binsh", "1.35-r0", "", "cmd:sh=1.35-r0 /bin/sh"),
            pkg("zlib-dev", "1.2.12-r0", "", "pc:zlib=1.2.12"),
            {
                let mut p = pkg("dash-binsh", "0.5-r0", "", "cmd:sh=0.5-r0 /bin/sh");
                p.provider_priority = Some(50);
                p
            },
            {
                let mut p = pkg("low", "1", "", "virt");
                p.provider_priority = Some(10);
                p
            },
            {
                let mut p = pkg("high", "1", "", "virt");
                p.provider_priority = Some(20);
                p
            },
            pkg("plain1", "1", "", "nopri"),
            pkg("plain2", "1", "", "nopri"),
            pkg("single", "1", "", "lonely"),
        ]);
        let repos = [RepoRef {
            tag: None,
            index: &i,
        }];
        // cmd:sh: dash-binsh has the priority.
        assert_eq!(
            run(&repos, "app").unwrap(),
            [
                "app-1",
                "dash-binsh-0.5-r0",
                "musl-1.2.3-r0",
                "zlib-dev-1.2.12-r0"
            ]
        );
        assert_eq!(run(&repos, "virt").unwrap(), ["high-1"]);
        assert_eq!(run(&repos, "lonely").unwrap(), ["single-1"]);
        let e = run(&repos, "nopri").unwrap_err();
        assert!(matches!(e, ResolveError::Ambiguous { .. }), "{e}");
        // Explicit choice of the provider satisfies the virtual name.
        assert_eq!(run(&repos, "plain2 nopri").unwrap(), ["plain2-1"]);
        // A versioned dependency is never satisfied by an unversioned provide.
        assert!(run(&repos, "virt>=1").is_err());
        // Exclusive versioned provides: two cmd:sh owners cannot coexist.
        let e = run(&repos, "busybox-binsh dash-binsh").unwrap_err();
        assert!(e.to_string().contains("both provide"), "{e}");
    }

    #[test]
    fn conflicts_and_backtracking() {
        let i = idx(vec![
            pkg("a", "2", "!c", ""),
            pkg("a", "1", "", ""),
            pkg("c", "1", "", ""),
            pkg("d", "1", "!e<2", ""),
            pkg("e", "1", "", ""),
        ]);
        let repos = [RepoRef {
            tag: None,
            index: &i,
        }];
        // a-2 forbids c: the resolver falls back to a-1.
        assert_eq!(run(&repos, "c a").unwrap(), ["a-1", "c-1"]);
        assert_eq!(run(&repos, "a").unwrap(), ["a-2"]);
        let e = run(&repos, "d e").unwrap_err();
        assert!(e.to_string().contains("forbids"), "{e}");
        let e = run(&repos, "a !a").unwrap_err();
        assert!(e.to_string().contains("the world forbids"), "{e}");
    }

    #[test]
    fn install_order_puts_dependencies_first() {
        let i = idx(vec![
            pkg("app", "1", "so:libz.so.1 base", ""),
            pkg("base", "1", "", ""),
            pkg("zlib", "1", "base", "so:libz.so.1=1"),
        ]);
        let r = resolve(
            &[RepoRef {
                tag: None,
                index: &i,
            }],
            &world("app"),
        )
        .unwrap();
        let names: Vec<&str> = r
            .install_order()
            .into_iter()
            .map(|k| r.packages[k].package.name.as_str())
            .collect();
        assert_eq!(names, ["base", "zlib", "app"]);
    }

    #[test]
    fn lockfile_pins() {
        let mut old = pkg("a", "1", "", "");
        old.checksum = crate::apk::index::Checksum::parse("Q1AAAAAAAAAAAAAAAAAAAAAAAAAAA=");
        let mut new = pkg("a", "2", "", "");
        new.checksum = crate::apk::index::Checksum::parse("Q1BBBBBBBBBBBBBBBBBBBBBBBBBBB=");
        let i = idx(vec![old, new]);
        let repos = [RepoRef {
            tag: None,
            index: &i,
        }];
        let pins = BTreeMap::from([(
            "a".to_string(),
            "Q1AAAAAAAAAAAAAAAAAAAAAAAAAAA=".to_string(),
        )]);
        let r = resolve_pinned(&repos, &world("a"), &pins).unwrap();
        assert_eq!(r.ids(), ["a-1"]);
        let gone = BTreeMap::from([(
            "a".to_string(),
            "Q1CCCCCCCCCCCCCCCCCCCCCCCCCCC=".to_string(),
        )]);
        assert!(matches!(
            resolve_pinned(&repos, &world("a"), &gone),
            Err(ResolveError::NotProvided { .. })
        ));
    }

    #[test]
    fn install_if() {
        let mut bash_comp = pkg("app-bash-completion", "1", "", "");
        bash_comp.install_if = Dependency::parse_list("app=1 bash").unwrap();
        let i = idx(vec![
            pkg("app", "1", "", ""),
            pkg("bash", "5", "", ""),
            bash_comp,
        ]);
        let repos = [RepoRef {
            tag: None,
            index: &i,
        }];
        assert_eq!(run(&repos, "app").unwrap(), ["app-1"]);
        assert_eq!(
            run(&repos, "app bash").unwrap(),
            ["app-1", "app-bash-completion-1", "bash-5"]
        );
    }

    #[test]
    fn unsatisfiable_names_the_chain() {
        let i = idx(vec![
            pkg("linux-lts", "5.15-r0", "mkinitfs", ""),
            pkg("mkinitfs", "3.6-r0", "so:libkmod.so.2", ""),
        ]);
        let repos = [RepoRef {
            tag: None,
            index: &i,
        }];
        let e = run(&repos, "linux-lts").unwrap_err();
        assert_eq!(
            e.to_string(),
            "world needs linux-lts, linux-lts-5.15-r0 needs mkinitfs, \
             mkinitfs-3.6-r0 needs so:libkmod.so.2 which no repository provides"
        );
    }

    fn fixture(name: &str) -> Index {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/alpine")
            .join(name);
        let bytes = std::fs::read(&p).unwrap();
        Index::from_tar_gz(&bytes, &KeyRing::alpine().unwrap(), Trust::Signed, name).unwrap()
    }

    const BASE: &str = "alpine-baselayout busybox musl ca-certificates-bundle iptables ip6tables \
                        conntrack-tools kmod";

    #[test]
    fn real_base_set_v316_x86_64_is_closed() {
        let i = fixture("v3.16-main-x86_64-APKINDEX.tar.gz");
        let w = world(&format!("{BASE} linux-virt"));
        let r = resolve(
            &[RepoRef {
                tag: None,
                index: &i,
            }],
            &w,
        )
        .unwrap();
        assert_closed(&r.packages, &w, &i);
        assert!(r.get("linux-virt").is_some());
        assert!(r.get("musl").is_some());
        assert!(r.packages.len() > 15, "{:?}", r.ids());
    }

    #[test]
    fn real_base_set_v317_aarch64_is_closed() {
        let i = fixture("v3.17-main-aarch64-APKINDEX.tar.gz");
        let w = world(&format!("{BASE} linux-lts"));
        let r = resolve(
            &[RepoRef {
                tag: None,
                index: &i,
            }],
            &w,
        )
        .unwrap();
        assert_closed(&r.packages, &w, &i);
        assert!(r.get("linux-lts").is_some());
        assert!(r.packages.len() > 15, "{:?}", r.ids());
    }

    #[test]
    fn real_index_unsatisfiable() {
        let i = fixture("v3.16-main-x86_64-APKINDEX.tar.gz");
        let e = run(
            &[RepoRef {
                tag: None,
                index: &i,
            }],
            "busybox no-such-package",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "world needs no-such-package which no repository provides"
        );
    }
}
