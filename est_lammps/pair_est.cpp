// pair_style est: see pair_est.h for the contract and README.md for the design.
#include "pair_est.h"

#include "atom.h"
#include "comm.h"
#include "error.h"
#include "force.h"
#include "memory.h"
#include "neigh_list.h"
#include "neighbor.h"
#include "update.h"
#include "utils.h"

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/cuda.h>
#include <torch/torch.h>
#include <torch/version.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <unordered_map>
#ifdef __GLIBC__
#include <malloc.h>
#endif

using namespace LAMMPS_NS;

namespace {

// The package format this plugin runs: est_calc.deploy.FORMAT and FORMAT_VERSION.
constexpr const char *EST_FORMAT = "est_calc.deploy";
constexpr const char *EST_FORMAT_VERSION = "2";

// Chemical symbols by atomic number (index 0 unused).
const char *const SYMBOLS[] = {
    "X",  "H",  "He", "Li", "Be", "B",  "C",  "N",  "O",  "F",  "Ne", "Na", "Mg", "Al", "Si",
    "P",  "S",  "Cl", "Ar", "K",  "Ca", "Sc", "Ti", "V",  "Cr", "Mn", "Fe", "Co", "Ni", "Cu",
    "Zn", "Ga", "Ge", "As", "Se", "Br", "Kr", "Rb", "Sr", "Y",  "Zr", "Nb", "Mo", "Tc", "Ru",
    "Rh", "Pd", "Ag", "Cd", "In", "Sn", "Sb", "Te", "I",  "Xe", "Cs", "Ba", "La", "Ce", "Pr",
    "Nd", "Pm", "Sm", "Eu", "Gd", "Tb", "Dy", "Ho", "Er", "Tm", "Yb", "Lu", "Hf", "Ta", "W",
    "Re", "Os", "Ir", "Pt", "Au", "Hg", "Tl", "Pb", "Bi", "Po", "At", "Rn", "Fr", "Ra", "Ac",
    "Th", "Pa", "U",  "Np", "Pu", "Am", "Cm", "Bk", "Cf", "Es", "Fm", "Md", "No", "Lr", "Rf",
    "Db", "Sg", "Bh", "Hs", "Mt", "Ds", "Rg", "Cn", "Nh", "Fl", "Mc", "Lv", "Ts", "Og"};
constexpr int N_ELEMENTS = sizeof(SYMBOLS) / sizeof(SYMBOLS[0]) - 1;

int atomic_number(const std::string &symbol)
{
  for (int z = 1; z <= N_ELEMENTS; ++z)
    if (symbol == SYMBOLS[z]) return z;
  return 0;
}

std::string major_minor(const std::string &version)
{
  // "2.13.0+cpu" -> "2.13"
  auto first = version.find('.');
  if (first == std::string::npos) return version;
  auto second = version.find_first_of(".+", first + 1);
  return version.substr(0, second);
}

std::string first_line(const std::string &text)
{
  auto end = text.find('\n');
  return end == std::string::npos ? text : text.substr(0, end);
}

// Whether an exception from libtorch is an allocation failure: CUDA's OutOfMemoryError, or the
// CPU allocator's failure (a c10::Error saying so), or std::bad_alloc.
bool out_of_memory(const std::exception &err)
{
  if (dynamic_cast<const c10::OutOfMemoryError *>(&err) != nullptr) return true;
  if (dynamic_cast<const std::bad_alloc *>(&err) != nullptr) return true;
  const std::string what = err.what();
  for (const char *sign : {"out of memory", "can't allocate memory", "not enough memory"})
    if (what.find(sign) != std::string::npos) return true;
  return false;
}

// Keep glibc from handing each step's freed temporaries back to the kernel (est_calc/allocator.py
// says why, with the measurements): libtorch's CPU tensors come straight from malloc, and a
// block that glibc maps on its own (every block above 32 MiB at least) or memory it trims off
// the heap is faulted in and zeroed afresh at the next step. An MD process keeps its largest
// step's memory instead: no block is mapped on its own and the heap is never trimmed, as est_calc
// does for `est md` (retain); EST_CALC_TUNE_MALLOC=moderate raises the thresholds only, as
// est_calc does for a library call. Not done where the user chose (MALLOC_* / GLIBC_TUNABLES,
// EST_CALC_TUNE_MALLOC=0, a preloaded allocator). Returns what was done: "retain", "moderate" or
// "" (nothing). Process-wide, so once per process.
const std::string &tune_malloc()
{
  static const std::string applied = []() -> std::string {
#ifdef __GLIBC__
    std::string choice;
    if (const char *env = std::getenv("EST_CALC_TUNE_MALLOC")) choice = env;
    for (char &ch : choice) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    if (choice == "0" || choice == "false" || choice == "no" || choice == "off") return "";
    for (const char *name : {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                             "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES"})
      if (std::getenv(name) != nullptr) return "";
    const char *preload = std::getenv("LD_PRELOAD");
    if (preload != nullptr)
      for (const char *lib : {"jemalloc", "tcmalloc", "mimalloc"})
        if (std::strstr(preload, lib) != nullptr) return "";
    if (choice == "moderate")
      return mallopt(M_MMAP_THRESHOLD, 64 << 20) == 1 && mallopt(M_TRIM_THRESHOLD, 256 << 20) == 1
          ? "moderate" : "";
    return mallopt(M_MMAP_MAX, 0) == 1 && mallopt(M_TRIM_THRESHOLD, -1) == 1 ? "retain" : "";
#else
    return "";
#endif
  }();
  return applied;
}

}    // namespace

PairEST::PairEST(LAMMPS *lmp) : Pair(lmp)
{
  tune_malloc();
  single_enable = 0;
  restartinfo = 0;
  one_coeff = 1;
  manybody_flag = 1;
  // The model returns the global virial itself (sum over edges of r_e (x) f_e), which equals
  // sum_i r_i (x) f_i over local and ghost atoms; f.r is not used.
  no_virial_fdotr_compute = 1;
  // Extra quantities for `compute pair est`: atoms given to the model, how many of them are
  // ghosts, and pairs (edges given, one per pair).
  nextra = 3;
  pvector = new double[nextra]();
}

PairEST::~PairEST()
{
  delete[] pvector;
  if (allocated) {
    memory->destroy(setflag);
    memory->destroy(cutsq);
  }
}

void PairEST::allocate()
{
  allocated = 1;
  int n = atom->ntypes + 1;
  memory->create(setflag, n, n, "pair:setflag");
  memory->create(cutsq, n, n, "pair:cutsq");
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) setflag[i][j] = 0;
}

// pair_style est [chunk_atoms N]: N bounds the local atoms given to the model at once (memory:
// a rank's atoms are evaluated in groups of at most N, each with its own halo of n_layers + 1
// hops; the results are those of one evaluation to round-off). Default: all at once.
void PairEST::settings(int narg, char **arg)
{
  chunk_atoms = 0;
  for (int k = 0; k < narg; ++k) {
    if (strcmp(arg[k], "chunk_atoms") == 0) {
      if (k + 1 >= narg)
        error->all(FLERR, "pair_style est: chunk_atoms needs a number of atoms: pair_style est "
                          "chunk_atoms N");
      char *end = nullptr;
      const long value = std::strtol(arg[k + 1], &end, 10);
      if (end == arg[k + 1] || *end != '\0' || value < 1 || value > 2147483647L)
        error->all(FLERR, "pair_style est: chunk_atoms needs a positive integer, got '{}'",
                   arg[k + 1]);
      chunk_atoms = static_cast<int>(value);
      ++k;
    } else {
      error->all(FLERR, "pair_style est: unknown option '{}' (pair_style est [chunk_atoms N])",
                 arg[k]);
    }
  }
}

// Opens the package after checking, in this order, that the file exists, is an est_calc
// package, of the format version this plugin runs, compiled by this torch, for a dtype and
// device that can run here. Every refusal is an error on all ranks (they read the same file).
void PairEST::load_model(const std::string &path)
{
  {
    std::ifstream probe(path, std::ios::binary);
    if (!probe.good())
      error->all(FLERR, "pair_style est: no model file '{}' (export one with `est export`)", path);
  }
  try {
    metadata = torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(path, "model");
  } catch (const std::exception &err) {
    error->all(FLERR,
               "pair_style est: '{}' is not an est_calc model (not an AOTInductor .pt2 "
               "package: {}); export one with `est export POTENTIAL -o model.pt2`",
               path, first_line(err.what()));
  }
  auto get = [&](const char *key) -> std::string {
    auto it = metadata.find(key);
    return it == metadata.end() ? std::string() : it->second;
  };
  if (get("est_format") != EST_FORMAT)
    error->all(FLERR,
               "pair_style est: '{}' is an AOTInductor package but not an est_calc model (no "
               "est_format={} in its metadata)",
               path, EST_FORMAT);
  if (get("est_format_version") != EST_FORMAT_VERSION)
    error->all(FLERR,
               "pair_style est: '{}' has model format version {} (est_calc {}); this plugin runs "
               "version {}: export the model again with the est_calc this plugin was built with, "
               "or rebuild the plugin (`make lammps`)",
               path, get("est_format_version"), get("est_calc_version"), EST_FORMAT_VERSION);
  const std::string torch_here = TORCH_VERSION;
  if (major_minor(get("torch_version")) != major_minor(torch_here))
    error->all(FLERR,
               "pair_style est: '{}' was compiled by torch {}; this plugin links torch {}, and "
               "a compiled model runs only under the torch version that made it: export it "
               "again with this torch",
               path, get("torch_version"), torch_here);
  const std::string dtype = get("dtype");
  if (dtype != "float64" && dtype != "float32")
    error->all(FLERR, "pair_style est: '{}' has an unknown dtype '{}'", path, dtype);
  float64 = dtype == "float64";
  const std::string device = get("device");
  if (device == "cuda") {
    if (!torch::cuda::is_available())
      error->all(FLERR,
                 "pair_style est: '{}' was compiled for CUDA and no CUDA device is visible "
                 "(export it with --device cpu to run on CPUs)",
                 path);
    use_cuda = true;
    // Ranks on one node share its GPUs round-robin by their rank within the node.
    MPI_Comm node;
    MPI_Comm_split_type(world, MPI_COMM_TYPE_SHARED, comm->me, MPI_INFO_NULL, &node);
    int node_rank = 0;
    MPI_Comm_rank(node, &node_rank);
    MPI_Comm_free(&node);
    gpu = static_cast<int>(node_rank % torch::cuda::device_count());
  } else if (device == "cpu") {
    use_cuda = false;
  } else {
    error->all(FLERR, "pair_style est: '{}' has an unknown device '{}'", path, device);
  }
  try {
    cutoff = std::stod(get("cutoff_A"));
    reach = std::stod(get("interaction_range_A"));
    n_layers = std::stoi(get("n_layers"));
  } catch (const std::exception &) {
    error->all(FLERR,
               "pair_style est: '{}' lacks a numeric cutoff_A, interaction_range_A or n_layers",
               path);
  }
  species.clear();
  std::istringstream zs(get("species"));
  for (long z; zs >> z;) species.push_back(z);
  if (species.empty()) error->all(FLERR, "pair_style est: '{}' names no species", path);

  try {
    model = std::make_unique<torch::inductor::AOTIModelPackageLoader>(
        path, "model", false, 1, static_cast<c10::DeviceIndex>(use_cuda ? gpu : -1));
  } catch (const std::exception &err) {
    error->all(FLERR, "pair_style est: the compiled model '{}' does not load here: {}", path,
               first_line(err.what()));
  }
  model_path = path;
  if (comm->me == 0 && !use_cuda) {
    // Serial kernels run on one thread whatever OMP_NUM_THREADS says (the usual layout: one
    // thread per MPI rank); OpenMP kernels (`est export --openmp`) on OMP_NUM_THREADS threads.
    const std::string threads = get("threads").empty() ? "openmp" : get("threads");
    utils::logmesg(lmp, "pair_style est: {} ({}, {} kernels{}); glibc malloc: {}\n",
                   path, dtype, threads,
                   threads == "serial" ? ": one thread per MPI rank" : ": OMP_NUM_THREADS threads",
                   tune_malloc() == "retain"
                       ? "freed memory kept for the next step (EST_CALC_TUNE_MALLOC=0 turns "
                         "this off)"
                       : tune_malloc() == "moderate"
                       ? "thresholds raised (EST_CALC_TUNE_MALLOC=moderate)"
                       : "left as it is");
  }
}

// pair_coeff * * model.pt2 El_1 ... El_ntypes: the model file, then the element of each LAMMPS
// atom type in order.
void PairEST::coeff(int narg, char **arg)
{
  if (!allocated) allocate();
  const int ntypes = atom->ntypes;
  if (narg != 3 + ntypes)
    error->all(FLERR,
               "pair_coeff for pair_style est: expected `pair_coeff * * model.pt2` and one "
               "element per atom type ({} types), got {} arguments",
               ntypes, narg);
  if (strcmp(arg[0], "*") != 0 || strcmp(arg[1], "*") != 0)
    error->all(FLERR, "pair_coeff for pair_style est must be `pair_coeff * * model.pt2 ...`");

  load_model(arg[2]);

  std::string known;
  for (long z : species) known += std::string(" ") + SYMBOLS[z];
  type_to_z.assign(ntypes + 1, 0);
  for (int t = 1; t <= ntypes; ++t) {
    const std::string symbol = arg[2 + t];
    const int z = atomic_number(symbol);
    if (z == 0)
      error->all(FLERR, "pair_coeff for pair_style est: '{}' (type {}) is not a chemical element",
                 symbol, t);
    bool found = false;
    for (long s : species) found = found || s == z;
    if (!found)
      error->all(FLERR,
                 "pair_coeff for pair_style est: element {} (type {}) is unknown to the model "
                 "'{}', which knows{}",
                 symbol, t, arg[2], known);
    type_to_z[t] = z;
  }
  for (int i = 1; i <= ntypes; ++i)
    for (int j = i; j <= ntypes; ++j) setflag[i][j] = 1;
}

void PairEST::init_style()
{
  if (force->newton_pair == 0)
    error->all(FLERR, "pair_style est requires newton_pair on (ghost forces are summed onto "
                      "their owners by reverse communication)");
  if (strcmp(update->unit_style, "metal") != 0)
    error->all(FLERR, "pair_style est requires `units metal` (eV and Angstrom)");
  if (comm->mode != Comm::SINGLE)
    error->all(FLERR, "pair_style est needs comm_modify mode single");

  // Periodic images of this rank's own atoms are folded onto them (compute()), which needs
  // atom IDs. On one rank every ghost is such an image: the model sees the local atoms only,
  // each with all its edges, so the ghosts need reach no further than r_c + skin (LAMMPS's
  // default ghost cutoff) and need no neighbour lists of their own.
  fold_images = atom->tag_enable != 0;
  ghost_lists = !(fold_images && comm->nprocs == 1);
  if (!ghost_lists) {
    neighbor->add_request(this, NeighConst::REQ_FULL);
    if (comm->me == 0)
      utils::logmesg(lmp, "pair_style est: one rank: periodic images folded onto their atoms, "
                          "the model sees the local atoms only\n");
    return;
  }

  // Atoms of other ranks: every atom, local or ghost, gets its full neighbour list, since a
  // ghost within n_layers x r_c of a local atom passes messages over all its edges; ghosts
  // reach out to (n_layers + 1) x r_c, plus the skin because ghosts are refreshed only at
  // reneighbouring. A smaller comm_modify cutoff is raised (never lowered).
  neighbor->add_request(this, NeighConst::REQ_FULL | NeighConst::REQ_GHOST);
  const double needed = reach + neighbor->skin;
  if (comm->cutghostuser < needed) {
    if (comm->me == 0)
      utils::logmesg(lmp,
                     "pair_style est: ghost cutoff set to {:.6g} A = (n_layers + 1) x r_c "
                     "({:.6g} A) + skin\n",
                     needed, reach);
    comm->cutghostuser = needed;
  }
}

double PairEST::init_one(int i, int j)
{
  if (setflag[i][j] == 0) error->all(FLERR, "pair_style est: pair_coeff * * ... is not set");
  return cutoff;
}

// One evaluation of the model on this rank's atoms. Its inputs are the package's signature
// (est_calc/deploy/__init__.py): positions, atomic numbers, one edge i -> j per pair closer than
// r_c with its shift (r_e = positions[j] - positions[i] + edge_shifts[e], Cartesian Å) of the atoms
// the local energies depend on, and local_mask = the nlocal owned atoms. It returns E_rank =
// sum of the local atoms' energies and its derivatives with respect to all positions given.
//
// Folding. A ghost that is a periodic image of a local atom (the same atom ID) is not given to
// the model: an edge i -> j to it becomes an edge to its local owner o with the shift
// x[j] - x[o] (a lattice vector), so the edge vector x[o] - x[i] + shift is x[j] - x[i] up to
// round-off. The image's features are its owner's (a local atom has all its edges), the
// derivative with respect to the edge lands on the owner directly, and the virial, which the
// package computes from edge vectors (sum over edges of -r_e (x) dE/dr_e), is unchanged. Ghosts
// owned by other ranks carry real positions; the copies of one such atom (its periodic images
// among the ghosts) fold the same way onto the copy the walk reaches first (chunk()), so that
// the graph is the periodic one, where each pair is one edge whose reverse the package implies
// (two unfolded copies would be two nodes, and the reverse of an edge folded onto one of them
// would be an edge the other already has). Their forces, per-atom energies and per-atom virials
// are summed onto their owners by reverse communication (newton on).
void PairEST::compute(int eflag, int vflag)
{
  ev_init(eflag, vflag);

  const int nlocal = atom->nlocal;
  const int nall = nlocal + atom->nghost;
  for (int k = 0; k < nextra; ++k) pvector[k] = 0.0;
  if (nlocal == 0) return;    // no energy on this rank, so no force on anything from it

  // owner[j]: the local index of the atom that LAMMPS atom j is (itself for a local atom, the
  // owner for a periodic image of a local atom), or -1 for an atom of another rank.
  std::vector<int> owner(nall, -1);
  for (int i = 0; i < nlocal; ++i) owner[i] = i;
  if (fold_images && nall > nlocal) {
    const tagint *tag = atom->tag;
    std::unordered_map<tagint, int> local_of;
    local_of.reserve(static_cast<size_t>(nlocal));
    for (int i = 0; i < nlocal; ++i) local_of.emplace(tag[i], i);
    for (int j = nlocal; j < nall; ++j) {
      auto it = local_of.find(tag[j]);
      if (it != local_of.end()) owner[j] = it->second;
    }
  }

  // Chunks (pair_style est chunk_atoms N): the local atoms in ceil(nlocal / N) groups of
  // consecutive positions along the longest extent of the sub-domain's atoms, each evaluated
  // with the atoms its energies depend on (chunk()). Without the keyword: one group, the local
  // atoms in LAMMPS's order.
  std::vector<int> order(nlocal);
  for (int i = 0; i < nlocal; ++i) order[i] = i;
  const int n_groups = chunk_atoms > 0 ? (nlocal + chunk_atoms - 1) / chunk_atoms : 1;
  if (n_groups > 1) {
    double **x = atom->x;
    int axis = 0;
    double widest = -1.0;
    for (int d = 0; d < 3; ++d) {
      double lo = x[0][d], hi = x[0][d];
      for (int i = 1; i < nlocal; ++i) {
        lo = std::min(lo, x[i][d]);
        hi = std::max(hi, x[i][d]);
      }
      if (hi - lo > widest) {
        widest = hi - lo;
        axis = d;
      }
    }
    std::stable_sort(order.begin(), order.end(),
                     [&](int a, int b) { return x[a][axis] < x[b][axis]; });
  }
  for (int g = 0; g < n_groups; ++g) {
    const int lo = static_cast<int>(static_cast<long long>(nlocal) * g / n_groups);
    const int hi = static_cast<int>(static_cast<long long>(nlocal) * (g + 1) / n_groups);
    chunk(order.data() + lo, hi - lo, owner, n_groups);
  }
}

// One evaluation of the model: the energies of the m local atoms group[0..m-1] and their
// derivatives. The graph the group's energies need, by hops along edges r < r_c from the group
// (hop 0): an atom's energy depends on its initial features (its own edges: one hop) carried
// over n_layers layers, so the group's energies need every atom up to n_layers + 1 hops and all
// the edges of every atom up to n_layers hops, and nothing else. An atom is represented by its
// local owner where it has one (owner[]), another rank's atom by the first of its copies the
// walk reaches (ghost_rep): the other copies are never walked from, the representatives' lists
// hold their edges. Local atoms outside the group are walked like any other (their lists are
// complete). The other ghosts are reached only along real edges from real positions, so one at
// hop h is within h x r_c of the sub-domain and, for h <= n_layers, its list is complete under
// the ghost cutoff (n_layers + 1) x r_c + skin (a representative has the fewest hops of its
// copies). Atoms further out are left out with their edges; the force on them is exactly zero.
// Nodes: the group first (in its order), then the others by hop; local_mask = the group.
void PairEST::chunk(const int *group, int m, const std::vector<int> &owner, int n_groups)
{
  const int nlocal = atom->nlocal;
  const int nall = nlocal + atom->nghost;
  double **x = atom->x;
  double **f = atom->f;
  const int *type = atom->type;

  // node[r]: the model's index of the atom represented by LAMMPS index r (a local atom or an
  // atom of another rank), or -1 while not (yet) in the graph.
  std::vector<int64_t> node(nall, -1);
  std::vector<int> kept(group, group + m);    // node -> LAMMPS index
  for (int k = 0; k < m; ++k) node[group[k]] = k;
  const double rc2 = cutoff * cutoff;
  std::unordered_map<tagint, int> ghost_rep;    // atom ID -> the ghost that stands for it
  std::vector<int64_t> centre, neighbour;    // nodes
  std::vector<double> shifts;                // (E, 3) Å
  size_t begin = 0;
  for (int level = 0; level <= n_layers; ++level) {
    const size_t end = kept.size();
    for (size_t k = begin; k < end; ++k) {
      const int i = kept[k];
      const int *jlist = list->firstneigh[i];
      const int jnum = list->numneigh[i];
      for (int jj = 0; jj < jnum; ++jj) {
        const int j = jlist[jj] & NEIGHMASK;
        const double dx = x[j][0] - x[i][0], dy = x[j][1] - x[i][1], dz = x[j][2] - x[i][2];
        if (dx * dx + dy * dy + dz * dz >= rc2) continue;
        int o = owner[j];
        if (o < 0 && !ghost_lists)
          error->one(FLERR, "pair_style est: ghost atom {} is not an image of a local atom "
                            "on a single rank (atom IDs not unique?)", atom->tag[j]);
        if (o < 0 && fold_images) {
          // Another rank's atom: its copies (periodic images among the ghosts) fold onto the
          // first one reached, which has the fewest hops and so a complete list.
          const auto found = ghost_rep.emplace(atom->tag[j], j);
          o = found.first->second;
        }
        const int r = o >= 0 ? o : j;
        if (node[r] < 0) {
          node[r] = static_cast<int64_t>(kept.size());
          kept.push_back(r);
        }
        // One edge per pair (package format 2): the pair of nodes k and node[r] is given from
        // the smaller node. A smaller neighbour has been walked already and gave it; a larger
        // one is walked later (and skips it) or, one hop beyond the last layer, never. An image
        // of k itself (a small cell) comes twice, with shifts s and -s: the one whose first
        // non-zero component is positive is given (the rule of est_calc's one_direction,
        // est_calc/neighbors/pairing.py).
        if (node[r] < static_cast<int64_t>(k)) continue;
        const double sx = x[j][0] - x[r][0], sy = x[j][1] - x[r][1], sz = x[j][2] - x[r][2];
        if (node[r] == static_cast<int64_t>(k) &&
            !(sx > 0.0 || (sx == 0.0 && (sy > 0.0 || (sy == 0.0 && sz > 0.0)))))
          continue;
        centre.push_back(static_cast<int64_t>(k));
        neighbour.push_back(node[r]);
        shifts.push_back(sx);    // x_image - x_owner for an image, zero for any other atom
        shifts.push_back(sy);
        shifts.push_back(sz);
      }
    }
    begin = end;
  }

  // The package takes at least one edge. Without any, add one placeholder atom 2 r_c from the
  // group's first atom (not local) and an edge to it: an edge longer than r_c contributes
  // exactly nothing.
  const int n_kept = static_cast<int>(kept.size());
  int n = n_kept;
  std::vector<double> pos(static_cast<size_t>(3) * (n_kept + 1));
  std::vector<int64_t> numbers(n_kept + 1);
  for (int k = 0; k < n_kept; ++k) {
    const int i = kept[k];
    pos[3 * k + 0] = x[i][0];
    pos[3 * k + 1] = x[i][1];
    pos[3 * k + 2] = x[i][2];
    numbers[k] = type_to_z[type[i]];
  }
  if (centre.empty()) {
    pos[3 * n_kept + 0] = x[kept[0]][0] + 2.0 * cutoff;
    pos[3 * n_kept + 1] = x[kept[0]][1];
    pos[3 * n_kept + 2] = x[kept[0]][2];
    numbers[n_kept] = numbers[0];
    centre.push_back(n_kept);
    neighbour.push_back(0);
    shifts.insert(shifts.end(), 3, 0.0);
    n = n_kept + 1;
  }
  const int64_t n_edges = static_cast<int64_t>(centre.size());

  const auto dtype = float64 ? torch::kFloat64 : torch::kFloat32;
  const torch::Device device = use_cuda
      ? torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(gpu))
      : torch::Device(torch::kCPU);
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  const auto i64 = torch::TensorOptions().dtype(torch::kInt64);

  std::vector<torch::Tensor> outputs;
  try {
    std::vector<int64_t> edges(centre);
    edges.insert(edges.end(), neighbour.begin(), neighbour.end());
    std::vector<torch::Tensor> inputs{
        torch::from_blob(pos.data(), {n, 3}, f64).to(device, dtype),
        torch::from_blob(numbers.data(), {n}, i64).to(device),
        torch::from_blob(edges.data(), {2, n_edges}, i64).to(device),
        torch::from_blob(shifts.data(), {n_edges, 3}, f64).to(device, dtype),
        (torch::arange(n, i64) < m).to(device)};
    outputs = model->run(inputs);
    for (auto &t : outputs) t = t.to(torch::kCPU, torch::kFloat64).contiguous();
  } catch (const std::exception &err) {
    if (out_of_memory(err))
      error->one(FLERR,
                 "pair_style est: out of memory on the {} evaluating {} atoms ({} of {} local "
                 "atoms in {} chunk(s)) and {} pairs on this rank; the run stops: use more MPI "
                 "ranks (or GPUs), smaller chunks (pair_style est chunk_atoms N) or a smaller "
                 "system ({})",
                 use_cuda ? "GPU" : "CPU", n, m, nlocal, n_groups, n_edges,
                 first_line(err.what()));
    error->one(FLERR, "pair_style est: the model '{}' failed: {}", model_path,
               first_line(err.what()));
  }
  if (outputs.size() != 5)
    error->one(FLERR, "pair_style est: the model returned {} outputs, not 5", outputs.size());

  const torch::Tensor &energy = outputs[0];
  const torch::Tensor &forces = outputs[2];
  if (!energy.isfinite().all().item<bool>() || !forces.isfinite().all().item<bool>())
    error->one(FLERR,
               "pair_style est: the model returned a non-finite energy or force (atoms too "
               "close?); the run stops");

  const double *fm = forces.data_ptr<double>();
  for (int k = 0; k < n_kept; ++k) {
    const int i = kept[k];
    f[i][0] += fm[3 * k + 0];
    f[i][1] += fm[3 * k + 1];
    f[i][2] += fm[3 * k + 2];
  }

  // What the model was given on this rank, summed over chunks (`compute ID all pair est` sums
  // them over ranks): atoms, those of them whose energies were not counted (ghosts, and with
  // chunks the other chunks' atoms), edges.
  pvector[0] += n_kept;
  pvector[1] += n_kept - m;
  pvector[2] += static_cast<double>(n_kept == n ? n_edges : 0);

  if (eflag_global) eng_vdwl += energy.item<double>();
  if (eflag_atom) {
    // Only the group's energies are this evaluation's to count (ghosts': their owners').
    const double *e = outputs[1].data_ptr<double>();
    for (int k = 0; k < m; ++k) eatom[kept[k]] += e[k];
  }
  // LAMMPS's virial components in order xx, yy, zz, xy, xz, yz, W = -dE/d strain.
  if (vflag_global) {
    const double *w = outputs[3].data_ptr<double>();
    virial[0] += w[0];
    virial[1] += w[4];
    virial[2] += w[8];
    virial[3] += 0.5 * (w[1] + w[3]);
    virial[4] += 0.5 * (w[2] + w[6]);
    virial[5] += 0.5 * (w[5] + w[7]);
  }
  if (vflag_atom) {
    // Ghosts' shares are summed onto their owners by reverse communication (newton on).
    const double *w = outputs[4].data_ptr<double>();
    for (int k = 0; k < n_kept; ++k) {
      const int i = kept[k];
      const double *wi = w + 9 * k;
      vatom[i][0] += wi[0];
      vatom[i][1] += wi[4];
      vatom[i][2] += wi[8];
      vatom[i][3] += 0.5 * (wi[1] + wi[3]);
      vatom[i][4] += 0.5 * (wi[2] + wi[6]);
      vatom[i][5] += 0.5 * (wi[5] + wi[7]);
    }
  }
}
