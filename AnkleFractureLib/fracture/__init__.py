"""Stage 5: locate and measure the fibular fracture line on the syndesmosis crop.

* :mod:`.targets`: the phantom's exact fracture surfaces as a line map on the crop grid;
* :mod:`.window`: the fibula-centred window of the crop the network reads;
* :mod:`.network`: the localiser (a small 3D U-Net);
* :mod:`.localise`: inference: found, probability, centre, height above the plafond, extent;
* :mod:`.weber_height`: the Danis-Weber class from the measured height, and its agreement with
  the classifier.
"""
