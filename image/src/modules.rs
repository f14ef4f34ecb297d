//! Kernel module selection from `depmod` output: resolves the modules the appliance needs, with
//! their hard dependencies (`modules.dep`) and their `pre:` soft dependencies
//! (`modules.softdep`, names resolved through `modules.alias`), in load order.

use crate::err;
use crate::error::Result;
use std::collections::{BTreeMap, BTreeSet};

/// A module's canonical name: file stem with `-` folded to `_` (the kernel treats them alike).
pub fn canonical(name: &str) -> String {
    let file = name.rsplit('/').next().unwrap_or(name);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

pub struct ModuleIndex {
    /// canonical name -> path relative to the modules directory
    paths: BTreeMap<String, String>,
    /// canonical name -> hard dependencies (canonical names)
    deps: BTreeMap<String, Vec<String>>,
    /// canonical name -> soft `pre:` dependencies (module names or aliases)
    soft_pre: BTreeMap<String, Vec<String>>,
    /// alias -> canonical names
    aliases: BTreeMap<String, Vec<String>>,
}

impl ModuleIndex {
    pub fn parse(modules_dep: &str, modules_softdep: &str, modules_alias: &str) -> Result<ModuleIndex> {
        let mut paths = BTreeMap::new();
        let mut deps = BTreeMap::new();
        for (n, line) in modules_dep.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (module, rest) =
                line.split_once(':').ok_or_else(|| err!("modules.dep line {}: no ':' in {line:?}", n + 1))?;
            let name = canonical(module);
            paths.insert(name.clone(), module.trim().to_string());
            deps.insert(name, rest.split_whitespace().map(canonical).collect());
        }
        let mut soft_pre: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for line in modules_softdep.lines().map(str::trim).filter(|l| l.starts_with("softdep ")) {
            let mut words = line.split_whitespace().skip(1);
            let Some(module) = words.next() else { continue };
            let mut in_pre = false;
            for word in words {
                match word {
                    "pre:" => in_pre = true,
                    "post:" => in_pre = false,
                    w if in_pre => soft_pre.entry(canonical(module)).or_default().push(w.to_string()),
                    _ => {}
                }
            }
        }
        let mut aliases: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for line in modules_alias.lines().map(str::trim).filter(|l| l.starts_with("alias ")) {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let [_, alias, module] = words[..] {
                aliases.entry(alias.to_string()).or_default().push(canonical(module));
            }
        }
        Ok(ModuleIndex { paths, deps, soft_pre, aliases })
    }

    /// Paths (relative to the modules dir) of `wanted` and everything they need, each after its
    /// dependencies. Names built into the kernel are accepted and skipped.
    pub fn load_order(&self, wanted: &[&str], builtin: &BTreeSet<String>) -> Result<Vec<String>> {
        let mut order = Vec::new();
        let mut done = BTreeSet::new();
        for name in wanted {
            let name = canonical(name);
            if !self.paths.contains_key(&name) {
                if builtin.contains(&name) {
                    continue;
                }
                return Err(err!("module {name} is neither in modules.dep nor built into the kernel"));
            }
            self.visit(&name, &mut done, &mut Vec::new(), &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        done: &mut BTreeSet<String>,
        stack: &mut Vec<String>,
        order: &mut Vec<String>,
    ) -> Result<()> {
        if done.contains(name) {
            return Ok(());
        }
        if stack.iter().any(|s| s == name) {
            return Err(err!("module dependency cycle: {} -> {name}", stack.join(" -> ")));
        }
        stack.push(name.to_string());
        for soft in self.soft_pre.get(name).into_iter().flatten() {
            for target in self.resolve_soft(soft) {
                self.visit(&target, done, stack, order)?;
            }
        }
        for dep in self.deps.get(name).into_iter().flatten() {
            if !self.paths.contains_key(dep) {
                return Err(err!("modules.dep names {dep} (needed by {name}) but has no entry for it"));
            }
            self.visit(dep, done, stack, order)?;
        }
        stack.pop();
        done.insert(name.to_string());
        if let Some(path) = self.paths.get(name) {
            order.push(path.clone());
        }
        Ok(())
    }

    /// A soft dependency names a module or an alias; unknown names are skipped (modprobe does too).
    fn resolve_soft(&self, soft: &str) -> Vec<String> {
        let name = canonical(soft);
        if self.paths.contains_key(&name) {
            return vec![name];
        }
        self.aliases
            .get(soft)
            .map(|targets| targets.iter().filter(|t| self.paths.contains_key(*t)).cloned().collect())
            .unwrap_or_default()
    }
}

/// Canonical names of modules built into the kernel (`modules.builtin`).
pub fn parse_builtin(modules_builtin: &str) -> BTreeSet<String> {
    modules_builtin.lines().filter(|l| !l.trim().is_empty()).map(canonical).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/arch/x86/kvm/kvm-amd.ko: kernel/drivers/crypto/ccp/ccp.ko kernel/arch/x86/kvm/kvm.ko kernel/virt/lib/irqbypass.ko
kernel/arch/x86/kvm/kvm.ko: kernel/virt/lib/irqbypass.ko
kernel/virt/lib/irqbypass.ko:
kernel/drivers/crypto/ccp/ccp.ko:
kernel/fs/xfs/xfs.ko: kernel/lib/libcrc32c.ko
kernel/lib/libcrc32c.ko:
kernel/crypto/crc32c_generic.ko:
kernel/arch/x86/crypto/crc32c-intel.ko:
";
    const SOFT: &str = "# comment\nsoftdep libcrc32c pre: crc32c post: something\n";
    const ALIAS: &str = "alias crc32c crc32c_generic\nalias crc32c crc32c_intel\nalias crypto-crc32c crc32c_generic\n";

    fn index() -> ModuleIndex {
        ModuleIndex::parse(DEP, SOFT, ALIAS).expect("parses")
    }

    fn position(order: &[String], stem: &str) -> usize {
        order.iter().position(|p| canonical(p) == stem).unwrap_or_else(|| panic!("{stem} missing from {order:?}"))
    }

    #[test]
    fn dependencies_load_before_their_users() {
        let order = index().load_order(&["kvm_amd"], &BTreeSet::new()).expect("resolves");
        assert_eq!(order.len(), 4);
        assert!(position(&order, "irqbypass") < position(&order, "kvm"));
        assert!(position(&order, "kvm") < position(&order, "kvm_amd"));
        assert!(position(&order, "ccp") < position(&order, "kvm_amd"));
    }

    #[test]
    fn soft_dependencies_resolve_through_aliases() {
        let order = index().load_order(&["xfs"], &BTreeSet::new()).expect("resolves");
        assert!(position(&order, "crc32c_generic") < position(&order, "libcrc32c"));
        assert!(position(&order, "crc32c_intel") < position(&order, "libcrc32c"));
        assert!(position(&order, "libcrc32c") < position(&order, "xfs"));
    }

    #[test]
    fn shared_dependencies_appear_once_and_dashes_match_underscores() {
        let order = index().load_order(&["kvm-amd", "kvm", "irqbypass"], &BTreeSet::new()).expect("resolves");
        assert_eq!(order.len(), 4);
    }

    #[test]
    fn builtin_modules_are_skipped_and_unknown_ones_fail() {
        let builtin = parse_builtin("kernel/drivers/block/loop.ko\n");
        assert!(index().load_order(&["loop"], &builtin).expect("builtin ok").is_empty());
        let error = index().load_order(&["nosuch"], &builtin).unwrap_err();
        assert!(error.0.contains("nosuch"));
    }

    #[test]
    fn malformed_and_cyclic_input_is_an_error() {
        assert!(ModuleIndex::parse("no colon here", "", "").is_err());
        let cyclic = ModuleIndex::parse("a.ko: b.ko\nb.ko: a.ko\n", "", "").expect("parses");
        assert!(cyclic.load_order(&["a"], &BTreeSet::new()).unwrap_err().0.contains("cycle"));
    }
}
