//! Parameter-level helpers: names, write-back and gradient flags, keyed by `ParamId`.

use std::collections::HashMap;

use burn::{
    module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId},
    tensor::{backend::Backend, Tensor},
};

/// Collects the dotted path (`blocks.0.conv.weight`) and gradient flag of every float
/// parameter.
#[derive(Default)]
pub(crate) struct ParamIndex {
    stack: Vec<String>,
    pub paths: HashMap<ParamId, String>,
    pub require_grad: HashMap<ParamId, bool>,
}

impl<B: Backend> ModuleVisitor<B> for ParamIndex {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.stack.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.paths.insert(param.id, self.stack.join("."));
        self.require_grad.insert(param.id, param.is_require_grad());
    }
}

impl ParamIndex {
    pub fn of<B: Backend, M: Module<B>>(module: &M) -> Self {
        let mut index = Self::default();
        module.visit(&mut index);
        index
    }

    /// The path of the module that holds `id` (the parameter path without its last part).
    pub fn owner(&self, id: &ParamId) -> Option<String> {
        let path = self.paths.get(id)?;
        Some(match path.rsplit_once('.') {
            Some((owner, _)) => owner.to_string(),
            None => String::from("<root>"),
        })
    }
}

/// Replaces the values of the parameters it holds (flattened), keeping ids and flags.
pub(crate) struct WriteBack<B: Backend> {
    pub values: HashMap<ParamId, Tensor<B, 1>>,
}

impl<B: Backend> ModuleMapper<B> for WriteBack<B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        match self.values.remove(&param.id) {
            Some(value) => param.map(|old| value.reshape(old.dims())),
            None => param,
        }
    }
}

/// Sets the gradient flag of every parameter it knows.
pub(crate) struct RestoreGrad {
    pub require_grad: HashMap<ParamId, bool>,
}

impl<B: Backend> ModuleMapper<B> for RestoreGrad {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        match self.require_grad.get(&param.id) {
            Some(&flag) => param.set_require_grad(flag),
            None => param,
        }
    }
}

/// Collects the values (flattened) of the parameters whose ids it is given.
pub(crate) struct Values<B: Backend> {
    pub ids: std::collections::HashSet<ParamId>,
    pub found: HashMap<ParamId, Tensor<B, 1>>,
}

impl<B: Backend> ModuleVisitor<B> for Values<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.ids.contains(&param.id) {
            self.found.insert(param.id, param.val().flatten(0, D - 1));
        }
    }
}
