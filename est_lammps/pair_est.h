// pair_style est: an est_calc potential exported with `est export` (an AOTInductor .pt2).
//
// Contract (see README.md): the model gets the local atoms, each with all its edges; a ghost
// that is a periodic image of a local atom is folded onto it (an edge to the owner with a
// lattice-vector shift). Ghosts owned by other ranks reach interaction_range_A =
// (n_layers + 1) x cutoff from the sub-domain and have full neighbour lists, so the local
// atoms' energies are exact; the force on every atom given (local or ghost) is
// -d(sum of local energies)/d position, and LAMMPS sums the ghosts' forces, per-atom energies
// and per-atom virials onto their owners (newton_pair on, reverse communication). On one rank
// every ghost is an image: the model sees the local atoms only.
#pragma once

#include "pair.h"

#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace torch::inductor {
class AOTIModelPackageLoader;
}

namespace LAMMPS_NS {

class PairEST : public Pair {
 public:
  explicit PairEST(class LAMMPS *);
  ~PairEST() override;

  void compute(int, int) override;
  void settings(int, char **) override;
  void coeff(int, char **) override;
  void init_style() override;
  double init_one(int, int) override;

 private:
  void allocate();
  void load_model(const std::string &path);
  void chunk(const int *group, int m, const std::vector<int> &owner, int n_groups);

  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> model;
  std::unordered_map<std::string, std::string> metadata;
  std::vector<long> species;          // atomic numbers the model knows
  std::vector<long> type_to_z;        // LAMMPS type (1..ntypes) -> atomic number
  double cutoff = 0.0;                // model cutoff r_c (Å)
  double reach = 0.0;                 // ghost reach: (n_layers + 1) x r_c (Å)
  int n_layers = 0;                   // message-passing layers of the model
  bool use_cuda = false;
  int gpu = 0;                        // this rank's CUDA device (node-local rank mod GPUs)
  bool float64 = true;
  bool fold_images = false;           // images of local atoms become their owners (atom IDs)
  bool ghost_lists = true;            // ghosts have lists and reach (n_layers + 1) x r_c + skin
  int chunk_atoms = 0;                // local atoms per model evaluation (0: all at once)
  std::string model_path;
};

}    // namespace LAMMPS_NS
